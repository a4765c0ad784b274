"""``nld-generate --image`` and ``/image`` in ``--chat`` on the tiny VLM, through ``main(argv)``:
the tokens equal the library's with the same images, and every error path is one line on
stderr with exit code 2, naming the argument or the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import nld_jax
from nld_jax.cli import generate as cli
from test_vision import TEXT_DIR, _write_vlm  # noqa: F401  (the fixture's checkpoint writer)

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    directory = _write_vlm(tmp_path_factory.mktemp("vlm-cli") / "ckpt")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(5)
    paths = []
    for n, shape in enumerate([(24, 32, 3), (32, 32, 3)]):
        paths.append(folder / f"picture{n}.png")
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(paths[-1])
    (folder / "notes.png").write_text("not a picture")
    return paths, folder


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_image_generates_what_the_library_generates(vlm_dir, pictures, capsys):
    (first, second), _ = pictures
    code, out, err = _run(["--checkpoint", str(vlm_dir), "--image", str(first), "--image", str(second),
                           "--prompt-ids", "1,40,41", "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0, err
    model = nld_jax.load(vlm_dir)
    expected = nld_jax.generate(model, [[1, 40, 41]], max_new_tokens=8, images=[[str(first), str(second)]])
    assert json.loads(out.splitlines()[0])["tokens"] == expected.tokens[0]


def _error(argv, capsys, match):
    code, _, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert match in err, err


def test_image_errors(vlm_dir, pictures, capsys):
    (first, _), folder = pictures
    ckpt = ["--checkpoint", str(vlm_dir), "--max-new-tokens", "2"]
    _error(ckpt + ["--image", str(folder / "missing.png"), "hi"], capsys,
           f"--image {folder / 'missing.png'}: no such image file")
    _error(ckpt + ["--image", str(folder), "hi"], capsys, f"--image {folder}: no such image file")
    _error(ckpt + ["--image", str(folder / "notes.png"), "hi"], capsys,
           f"--image {folder / 'notes.png'}: not a readable image")
    # seven 32 x 32 images of 4 x (4 + 1) layout tokens each: 140 positions, the context is 128
    _error(ckpt + ["--image", str(pictures[0][1])] * 7 + ["hi"], capsys,
           "--image: prompt 0 is 143 tokens with its 7 image(s)")
    _error(ckpt + ["--image", str(first), "one", "two"], capsys, "--image: the images go with one prompt, and 2")
    _error(["--checkpoint", str(TEXT_DIR), "--image", str(first), "hi"], capsys,
           f"--image: {TEXT_DIR} is a text-only checkpoint")


def test_image_without_checkpoint_uses_the_demo_vlm_when_there_is_one(vlm_dir, pictures, capsys, monkeypatch,
                                                                     tmp_path):
    (first, _), _ = pictures
    monkeypatch.setattr(cli, "DEMO_VLM", str(tmp_path / "no-demo-vlm"))
    _error(["--image", str(first), "hi"], capsys, "no checkpoint given and no embedded demo VLM: pass --checkpoint")
    monkeypatch.setattr(cli, "DEMO_VLM", str(vlm_dir))
    code, out, err = _run(["--image", str(first), "--prompt-ids", "1,40", "--max-new-tokens", "4", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out.splitlines()[0])["tokens"]) >= 1


def test_chat_image_command(vlm_dir, pictures, capsys, monkeypatch):
    """'/image PATH' attaches an image to the next message; a bad path is reported and the chat
    goes on; the reply is what generate gives for the chat template's prompt with that image."""
    (first, _), folder = pictures
    lines = iter([f"/image {folder / 'missing.png'}", f"/image {first}", "/images", "describe it", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = _run(["--checkpoint", str(vlm_dir), "--chat", "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    assert "missing.png: no such image file" in err and "(1 image(s) attached" in err
    model = nld_jax.load(vlm_dir)
    vc = model.vision_config
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe it"}]}]
    ids = model.tokenizer.apply_chat_template(messages, image_token_id=vc.image_token_id)
    expected = nld_jax.generate(model, [ids], max_new_tokens=6, images=[[str(first)]])
    assert expected.text[0].strip() in out


def test_help_names_image(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "--image PATH" in text and "/image PATH" in text
