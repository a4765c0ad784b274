"""The vision-language variant: Pillow preprocessing, the Pixtral tower and the Mistral3 projector
against transformers' own modules (tests/data/vlm-tiny, made by
tests/golden_scripts/make_vlm_golden.py), the splice of image tokens into prompt embeddings, and
generation with images in every mode on a tiny VLM checkpoint: the golden tiny text model plus
the golden vision weights, in NVIDIA's layout (a two-shard index)."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

import nld_jax
from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.safetensors_io import SafetensorsFile
from nld_jax.config import ConfigError
from nld_jax.vision import encoder
from nld_jax.vision.features import pack_images, vision_tokens
from nld_jax.vision.preprocess import ImageError, image_token_layout, preprocess_image
from nld_jax.vision.prompts import multimodal_prompts

ROOT = pathlib.Path(__file__).resolve().parents[1]
VLM_DATA = ROOT / "tests" / "data" / "vlm-tiny"
TEXT_DIR = ROOT / "tests" / "data" / "nld-tiny"
# float32 throughout; the tower's outputs reach ~6 in magnitude and differ from torch's by ~3e-6.
ATOL = {"pixels": 1e-5, "hidden": 2e-5, "features": 2e-5}


@pytest.fixture(scope="module")
def golden():
    with open(VLM_DATA / "cases.json") as f:
        cases = json.load(f)
    return cases, dict(np.load(VLM_DATA / "golden.npz"))


def _write_vlm(directory: pathlib.Path, drop: tuple[str, ...] = (), **config_changes) -> pathlib.Path:
    """nld-tiny + the golden vision weights as a VLM checkpoint in NVIDIA's layout, two shards."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(TEXT_DIR / "config.json") as f:
        config = json.load(f)
    with open(VLM_DATA / "vision_config.json") as f:
        config.update(json.load(f))
    config.update(config_changes)
    for key in drop:
        config.pop(key, None)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TEXT_DIR / name, directory / name)
    shards = {"model-00001-of-00002.safetensors": TEXT_DIR / "model.safetensors",
              "model-00002-of-00002.safetensors": VLM_DATA / "vision.safetensors"}
    weight_map = {}
    for name, source in shards.items():
        shutil.copy(source, directory / name)
        weight_map.update({key: name for key in SafetensorsFile(str(source), str(source)).keys()})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return _write_vlm(tmp_path_factory.mktemp("vlm") / "nld-vlm-tiny")


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return nld_jax.load(vlm_dir, dtype="float32")


def _golden_images(cases, arrays):
    return [Image.fromarray(arrays[f"image{i}"], mode) for i, mode in enumerate(cases["modes"])]


def test_preprocess_matches_transformers(vlm, golden):
    """Resize (smaller, larger, square, alpha on white, grayscale), round up to P * M, rescale,
    CLIP-normalise: as PixtralImageProcessorPil with patch_size = P * M."""
    cases, arrays = golden
    for i, image in enumerate(_golden_images(cases, arrays)):
        ours = preprocess_image(image, vlm.vision_config)
        ref = arrays[f"pixel_values{i}"].transpose(1, 2, 0)
        assert ours.shape == ref.shape == (*cases["image_sizes"][i], 3)
        np.testing.assert_allclose(ours, ref, atol=ATOL["pixels"], rtol=0)
    # the same images handed over as arrays (uint8 [H, W, 4] and [H, W])
    np.testing.assert_allclose(preprocess_image(arrays["image3"], vlm.vision_config),
                               arrays["pixel_values3"].transpose(1, 2, 0), atol=ATOL["pixels"], rtol=0)
    np.testing.assert_allclose(preprocess_image(arrays["image4"], vlm.vision_config),
                               arrays["pixel_values4"].transpose(1, 2, 0), atol=ATOL["pixels"], rtol=0)


def test_tower_and_projector_match_transformers(vlm, golden, monkeypatch):
    """All five images packed in one call (block-diagonal attention), as transformers runs them;
    with the attention's queries in one chunk and in many."""
    cases, arrays = golden
    pixels = [arrays[f"pixel_values{i}"].transpose(1, 2, 0) for i in range(len(cases["modes"]))]
    packed = pack_images(pixels, vlm.vision_config)
    n = arrays["hidden"].shape[0]
    for chunk in (encoder.QUERY_CHUNK, 32):
        monkeypatch.setattr(encoder, "QUERY_CHUNK", chunk)
        hidden = np.asarray(encoder.encode(vlm.vision["tower"], vlm.vision_config, packed.patches, packed.rows,
                                           packed.cols, packed.segments))
        np.testing.assert_allclose(hidden[:n], arrays["hidden"], atol=ATOL["hidden"], rtol=0)
    monkeypatch.undo()
    tokens = vision_tokens(vlm.vision, vlm.vision_config, pixels)
    assert [t.shape[0] for t in tokens] == cases["tokens_per_image"]
    np.testing.assert_allclose(np.concatenate(tokens), arrays["features"], atol=ATOL["features"], rtol=0)
    # packing changes nothing: one image alone gives its slice of the packed result
    alone = vision_tokens(vlm.vision, vlm.vision_config, pixels[1:2])[0]
    np.testing.assert_allclose(alone, tokens[1], atol=1e-5, rtol=0)


def test_image_layout_and_splice(vlm, golden):
    cases, arrays = golden
    vc = vlm.vision_config
    assert image_token_layout(2, 3, vc) == [10, 10, 10, 12, 10, 10, 10, 13]
    images = [[arrays["image2"]], [], [arrays["image0"], arrays["image2"]]]
    ids = [[1, 5, 10, 6], [1, 7, 8], [1, 9]]  # a placeholder; no image; none (images go after BOS)
    placed, emb = multimodal_prompts(vlm.vision, vc, vlm.params, ids, images, 1, 128)
    assert placed[0] == [1, 5, *image_token_layout(2, 2, vc), 6]
    assert placed[1] == [1, 7, 8]
    assert placed[2] == [1, *image_token_layout(3, 4, vc), *image_token_layout(2, 2, vc), 9]
    feats = vision_tokens(vlm.vision, vc, [preprocess_image(arrays[k], vc) for k in ("image2", "image0")])
    table = np.asarray(vlm.params["embed_tokens"])
    for b, row_feats in enumerate([[feats[0]], [], [feats[1], feats[0]]]):
        is_image = np.asarray(placed[b]) == vc.image_token_id
        expected = table[placed[b]]
        if row_feats:
            expected[is_image] = np.concatenate(row_feats)
        np.testing.assert_allclose(emb[b, :len(placed[b])], expected, atol=1e-6, rtol=0)
    # a prompt already holding the full layout is kept as it is
    again, _ = multimodal_prompts(vlm.vision, vc, vlm.params, [placed[0]], [[arrays["image2"]]], 1, 128)
    assert again == [placed[0]]


@pytest.fixture(scope="module")
def image_batch(golden):
    _, arrays = golden
    prompts = [[1, 40, 10, 41, 10, 42], [1, 43, 44, 45], [1, 46, 47]]
    images = [[arrays["image2"], arrays["image3"]], None, [arrays["image0"]]]
    return prompts, images


def test_greedy_spec_equals_greedy_ar_with_images(vlm, image_batch):
    """Ragged images per row (two, none, one); spec and spec_quadratic equal AR, diffusion runs;
    the images change what the model writes, and a row is the same alone as in the batch."""
    prompts, images = image_batch
    ar = nld_jax.generate(vlm, prompts, mode="ar", max_new_tokens=16, images=images)
    for mode in ("spec", "spec_quadratic"):
        out = nld_jax.generate(vlm, prompts, mode=mode, max_new_tokens=16, block_length=8, images=images)
        assert out.tokens == ar.tokens, mode
    diffusion = nld_jax.generate(vlm, prompts, mode="diffusion", max_new_tokens=16, block_length=8, images=images)
    assert all(len(t) >= 1 for t in diffusion.tokens)
    text_only = nld_jax.generate(vlm, prompts, mode="ar", max_new_tokens=16)
    assert text_only.tokens[1] == ar.tokens[1]  # the row without images
    assert text_only.tokens[0] != ar.tokens[0] or text_only.tokens[2] != ar.tokens[2]
    alone = nld_jax.generate(vlm, prompts[2:], mode="ar", max_new_tokens=16, images=images[2:])
    assert alone.tokens[0] == ar.tokens[2]


def test_forward_and_block_logits_with_images(vlm, image_batch):
    """Causal logits with images: their argmax at the last prompt position is greedy AR's first
    token; block logits take the images in the prefix; a prompt that does not hold the full
    layouts is refused (positions must stay the caller's)."""
    prompts, images = image_batch
    placed, _ = multimodal_prompts(vlm.vision, vlm.vision_config, vlm.params, prompts[:1], images[:1], 1, 128)
    logits = np.asarray(nld_jax.forward(vlm, placed, images=images[:1]))
    first = nld_jax.generate(vlm, prompts[:1], mode="ar", max_new_tokens=1, images=images[:1]).tokens[0][0]
    assert int(np.argmax(logits[0, -1])) == first
    plain = np.asarray(nld_jax.forward(vlm, placed))
    assert np.abs(plain[0, -1] - logits[0, -1]).max() > 1e-3  # the images matter
    block = [[first] + [vlm.config.mask_token_id] * 7]
    diffusion = np.asarray(nld_jax.block_logits(vlm, placed, block, images=images[:1]))
    assert diffusion.shape == (1, 8, vlm.config.V) and np.isfinite(diffusion).all()
    with pytest.raises(ValueError, match="full layout"):
        nld_jax.forward(vlm, [prompts[0]], images=images[:1])


def test_sharded_equals_unsharded_with_images(vlm_dir, vlm, image_batch):
    """The vision weights sharded like the text model's (heads and MLP over tensor, the model
    dimension over fsdp): the same greedy tokens as on one device."""
    from nld_jax.sharding import make_mesh

    prompts, images = image_batch
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    sharded = nld_jax.load(vlm_dir, dtype="float32", mesh=mesh)
    q_proj = sharded.vision["tower"]["layers"]["attention"]["q_proj"]
    assert q_proj.sharding.spec[2] == "tensor"  # [Lv, Dv, Hv, Dhv]: heads over tensor
    ar = nld_jax.generate(vlm, prompts, mode="ar", max_new_tokens=8, images=images)
    assert nld_jax.generate(sharded, prompts, mode="ar", max_new_tokens=8, images=images).tokens == ar.tokens


def test_text_api_unchanged_on_vlm_checkpoint(vlm, tiny):
    assert tiny.vision is None and vlm.vision is not None
    prompt = [[1, 40, 41, 42, 43]]
    assert (nld_jax.generate(vlm, prompt, max_new_tokens=8).tokens
            == nld_jax.generate(tiny, prompt, max_new_tokens=8).tokens)


def test_errors(vlm, tiny, golden, tmp_path):
    _, arrays = golden
    with pytest.raises(ValueError, match="text-only"):
        nld_jax.generate(tiny, [[1, 5]], images=[[arrays["image0"]]])
    # eight 32 x 24 images of 4 x (3 + 1) layout tokens each, 130 tokens with BOS and 5
    with pytest.raises(ValueError, match="130 tokens with its 8 image.*context of 128"):
        nld_jax.generate(vlm, [[1, 5]], images=[[arrays["image1"]] * 8], max_new_tokens=1)
    with pytest.raises(ValueError, match="one list of images"):
        nld_jax.generate(vlm, [[1, 5], [1, 6]], images=[[arrays["image0"]]])
    with pytest.raises(ValueError, match="holds 2 image token"):
        nld_jax.generate(vlm, [[1, 10, 10, 5]], images=[[arrays["image0"]]])
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="missing.png: no such image file"):
        nld_jax.generate(vlm, [[1, 5]], images=[[str(missing)]])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        nld_jax.generate(vlm, [[1, 5]], images=[[not_image]])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="image_token_id"):
        nld_jax.load(_write_vlm(tmp_path / "no-id", drop=("image_token_id",)))
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        nld_jax.load(_write_vlm(tmp_path / "layer", vision_feature_layer=-2))
    # the text-only config with the vision tensors present: they are unknown tensors
    text_only = _write_vlm(tmp_path / "text-config", drop=("vision_config", "model_type"))
    with pytest.raises(CheckpointError, match="unknown tensor"):
        nld_jax.load(text_only)
