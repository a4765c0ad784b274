"""What a VLM checkpoint says about its inputs: the longest image edge from Pixtral's
``preprocessor_config.json`` (else config.json's ``vision_config.image_size``), read under the
trust rule and refused naming the file and field; and chat messages with image content parts,
rendered by the checkpoint's chat template into ``[IMG]`` placeholders, their images in order."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import nld_jax
from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.config import ConfigError
from nld_jax.tokenizer import chat_images
from nld_jax.vision.preprocess import preprocess_image
from test_vision import _write_vlm  # noqa: F401  (the fixture's checkpoint writer)

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_vlm(tmp_path_factory):
    directory = _write_vlm(tmp_path_factory.mktemp("vlm-chat") / "ckpt")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return nld_jax.load(directory, dtype="float32")


def _with_preprocessor(tmp_path, content) -> "os.PathLike":
    directory = _write_vlm(tmp_path / "ckpt")
    text = content if isinstance(content, str) else json.dumps(content)
    (directory / "preprocessor_config.json").write_text(text)
    return directory


def test_longest_edge_from_preprocessor_config(tmp_path):
    pixtral = {"image_processor_type": "PixtralImageProcessor", "size": {"longest_edge": 16},
               "patch_size": {"height": 4, "width": 4}, "do_resize": True}
    model = nld_jax.load(_with_preprocessor(tmp_path, pixtral))
    assert model.vision_config.longest_edge == 16 and model.vision_config.image_size == 32
    image = np.zeros((24, 32, 3), np.uint8)
    assert preprocess_image(image, model.vision_config).shape == (16, 16, 3)  # 12 x 16, sides rounded up to 8
    placed = nld_jax.generate(model, [[1, 5]], images=[[image]], max_new_tokens=1)
    assert len(placed.tokens[0]) == 1


def test_longest_edge_falls_back_to_the_config(tmp_path):
    model = nld_jax.load(_write_vlm(tmp_path / "plain"))
    assert model.vision_config.max_image_size is None and model.vision_config.longest_edge == 32
    assert preprocess_image(np.zeros((24, 64, 3), np.uint8), model.vision_config).shape == (16, 32, 3)
    # a preprocessor_config.json without a size says nothing about it
    assert nld_jax.load(_with_preprocessor(tmp_path / "no-size", {"do_resize": True})).vision_config.longest_edge == 32


@pytest.mark.parametrize("content, match", [
    ({"size": {"longest_edge": 0}}, r"preprocessor_config.json: size=.*longest_edge"),
    ({"size": {"longest_edge": True}}, r"preprocessor_config.json: size=.*longest_edge"),
    ({"size": {"height": 224, "width": 224}}, r"preprocessor_config.json: size=.*longest_edge"),
    ({"size": "1540"}, r"preprocessor_config.json: size=.*longest_edge"),
    ([1540], r"preprocessor_config.json: must hold a JSON object"),
    ("{not json", r"preprocessor_config.json"),
])
def test_bad_preprocessor_config_is_refused(tmp_path, content, match):
    with pytest.raises(ConfigError, match=match):
        nld_jax.load(_with_preprocessor(tmp_path, content))


def test_preprocessor_config_link_out_is_refused(tmp_path):
    directory = _write_vlm(tmp_path / "ckpt")
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"size": {"longest_edge": 16}}))
    os.symlink(outside, directory / "preprocessor_config.json")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        nld_jax.load(directory)


def test_chat_template_with_image_parts(chat_vlm, tmp_path):
    """Each image part becomes one [IMG] placeholder where it stands; chat_images lists the
    images in that order; generating from the two equals generating from the prompt built by hand."""
    tok, vc = chat_vlm.tokenizer, chat_vlm.vision_config
    rng = np.random.default_rng(11)
    first, second = rng.integers(0, 256, (24, 32, 3), np.uint8), rng.integers(0, 256, (16, 16, 3), np.uint8)
    path = tmp_path / "second.png"
    Image.fromarray(second).save(path)
    messages = [{"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image", "image": first},
                                             {"type": "text", "text": " and "},
                                             {"type": "image_url", "image_url": {"url": f"file://{path}"}}]}]
    ids = tok.apply_chat_template(messages, image_token_id=vc.image_token_id)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert ids == enc("<s><user>look ") + [vc.image_token_id] + enc(" and ") + [vc.image_token_id] + \
        enc("\n<assistant>")
    images = chat_images(messages)
    assert images[0] is first and images[1] == str(path)
    by_hand = [[1, *ids[1:]]]
    out = nld_jax.generate(chat_vlm, [ids], images=[images], max_new_tokens=6)
    assert out.tokens == nld_jax.generate(chat_vlm, by_hand, images=[[first, second]], max_new_tokens=6).tokens
    # a bare {"type": "image"} part: the placeholder, its image given separately
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    assert chat_images(bare) == [None]
    assert tok.apply_chat_template(bare, image_token_id=vc.image_token_id).count(vc.image_token_id) == 1


def test_chat_template_uses_the_tokenizers_own_image_token(chat_vlm):
    """A tokenizer that spells the image id as one token ([IMG]) tokenizes the template's text whole."""
    from nld_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_vlm.path)  # its own copy: the fixture's stays as it is
    tok._backend.add_special_tokens(["[IMG]"])
    img = tok.token_id("[IMG]")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    ids = tok.apply_chat_template(messages, image_token_id=img)
    assert ids == tok.encode("<s><user>a[IMG]\n<assistant>", add_special_tokens=False) and ids.count(img) == 1


@pytest.mark.parametrize("part, match", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, r"content\[0\].*not a local file"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "not a local file"),
    ({"type": "video"}, r"messages\[0\].content\[0\]: a content part must be"),
    ({"type": "text"}, "a content part must be"),
])
def test_bad_content_parts_are_refused(chat_vlm, part, match):
    with pytest.raises(ValueError, match=match):
        chat_vlm.tokenizer.apply_chat_template([{"role": "user", "content": [part]}],
                                               image_token_id=chat_vlm.vision_config.image_token_id)


def test_image_parts_for_a_text_only_checkpoint_are_refused(chat_vlm):
    with pytest.raises(ValueError, match="text-only"):
        chat_vlm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
