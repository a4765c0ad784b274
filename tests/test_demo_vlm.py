"""The demo VLM (nld_jax/assets/demo-vlm, made by examples/train_tiny_vlm.py): it loads and answers
held-out pictures, greedy spec == greedy AR in fewer forwards; the VLM training path builds the
same prompt embeddings as generation and reduces to the text objective without images; the
training script runs end to end at a tiny size."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.training import LossConfig, mask_tokens, nld_loss, vlm_batch, vlm_inputs, vlm_rows
from nld_jax.vision.prompts import multimodal_prompts

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "nld_jax" / "assets" / "demo-vlm"
sys.path.insert(0, str(ROOT / "examples"))
import train_tiny_vlm  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return nld_jax.load(DEMO, dtype="float32")


def test_demo_vlm_is_a_vlm_checkpoint(demo):
    with open(DEMO / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "nemotron_labs_diffusion_vlm" and "vision_config" in config
    assert demo.vision is not None and demo.vision_config.image_token_id == demo.tokenizer.token_id("[IMG]")
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 4 * 2**20, f"the demo VLM is {size / 2**20:.1f} MiB"
    with open(DEMO / "train_report.json") as f:
        report = json.load(f)
    assert report["spec_b32_equals_ar"] and report["ar"]["accuracy"] >= 0.85


@pytest.mark.parametrize("index", [0, 4])  # a question and a three-shape caption
def test_demo_vlm_answers_held_out_pictures(demo, index):
    image, prompt, answer = train_tiny_vlm.held_out_example(index)
    outputs = {mode: nld_jax.generate(demo, [prompt], images=[[image]], mode=mode, max_new_tokens=64,
                                      block_length=32) for mode in ("ar", "spec")}
    assert outputs["ar"].text[0] == answer, (prompt, answer, outputs["ar"].text[0])
    assert outputs["spec"].tokens[0] == outputs["ar"].tokens[0]  # greedy self-speculation == greedy AR
    # A caption takes spec fewer forwards than AR; a one-word answer may take one more (the
    # prefill's token, then a draft and its verify for the few bytes left).
    if len(answer) >= 16:
        assert outputs["spec"].nfe[0] < outputs["ar"].nfe[0] / 2
    else:
        assert outputs["spec"].nfe[0] <= outputs["ar"].nfe[0] + 1


def _tiny(tmp_path):
    tok = train_tiny_vlm.make_tokenizer(str(tmp_path / "tok"))
    config, vision = train_tiny_vlm.model_configs("smoke", tok, 96)
    from nld_jax.params import init_params
    from nld_jax.vision.params import init_vision_params

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return tok, config, vision, {"text": init_params(config, k1, jnp.float32, std=0.5),
                                 "vision": init_vision_params(vision, k2, jnp.float32, std=0.5)}


def test_training_embeddings_equal_generation_embeddings(tmp_path):
    """The train step's input embeddings (vlm_rows + vlm_batch + vlm_inputs) are the prompt
    embeddings generation builds for the same pictures (multimodal_prompts), position by position."""
    tok, config, vision, trainable = _tiny(tmp_path)
    examples = [train_tiny_vlm.training_example(i) for i in range(3)]
    rows = [(tok.encode(p), tok.encode(a, add_special_tokens=False), [im]) for im, p, a in examples]
    tokens, loss_mask, pixels = vlm_rows(rows, vision, 96, tok.bos_id, config.eos_token_id)
    batch = {k: jnp.asarray(v) for k, v in vlm_batch(tokens, loss_mask, pixels, vision).items()}
    _, emb = jax.jit(lambda t, b: vlm_inputs(t, b, config=vision))(trainable, batch)
    placed, want = multimodal_prompts(trainable["vision"], vision, trainable["text"], [r[0] for r in rows],
                                      [r[2] for r in rows], tok.bos_id, 256)
    for b, ids in enumerate(placed):
        n = len(ids)
        assert tokens[b, :n].tolist() == ids
        assert loss_mask[b, :n].sum() == 0 and loss_mask[b].sum() == len(rows[b][1]) + 1  # answer + EOS only
        np.testing.assert_allclose(np.asarray(emb[b, :n]), want[b, :n], rtol=1e-5, atol=1e-5)
    assert int((tokens == vision.image_token_id).sum()) == 3 * 4  # 2x2 image tokens per picture


def test_objective_with_token_embeddings_equals_text_objective(tmp_path):
    """embeddings = the tokens' own embeddings gives exactly the text objective (the image path
    only changes the image positions)."""
    tok, config, vision, trainable = _tiny(tmp_path)
    params = trainable["text"]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 4, 200)
    masked, p = mask_tokens(jax.random.PRNGKey(2), tokens, 1e-3)
    plain = nld_loss(params, config, tokens, masked, p, 8, LossConfig())
    with_emb = nld_loss(params, config, tokens, masked, p, 8, LossConfig(), embeddings=params["embed_tokens"][tokens])
    np.testing.assert_allclose(float(with_emb[0]), float(plain[0]), rtol=1e-6)


def test_save_hf_checkpoint_writes_a_vlm(tmp_path):
    """save_hf_checkpoint(vision=, vision_config=) writes NVIDIA's VLM layout; it loads back exactly."""
    from nld_jax.checkpoint.hf_write import save_hf_checkpoint
    from nld_jax.params import flatten_tree

    tok, config, vision, trainable = _tiny(tmp_path)
    out = tmp_path / "ckpt"
    save_hf_checkpoint(str(out), config, trainable["text"], tokenizer_dir=str(tmp_path / "tok"), dtype="float32",
                       vision=trainable["vision"], vision_config=vision)
    with open(out / "config.json") as f:
        hf = json.load(f)
    assert hf["model_type"] == "nemotron_labs_diffusion_vlm" and hf["image_token_id"] == vision.image_token_id
    model = nld_jax.load(out, dtype="float32")
    assert model.vision_config == vision
    for mine, back in ((trainable["text"], model.params), (trainable["vision"], model.vision)):
        want, got = flatten_tree(mine), flatten_tree(back)
        assert set(want) == set(got)
        for path in want:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
    with pytest.raises(ValueError, match="together"):
        save_hf_checkpoint(str(tmp_path / "bad"), config, trainable["text"], vision=trainable["vision"])


@pytest.mark.slow
def test_train_tiny_vlm_smoke(tmp_path):
    out = tmp_path / "vlm"
    report = train_tiny_vlm.main(["--out", str(out), "--size", "smoke", "--steps", "3", "--eval-examples", "1",
                                  "--no-progress"])
    assert set(train_tiny_vlm.SETTINGS) <= set(report)
    model = nld_jax.load(out)
    assert model.vision is not None
    # resumable: a second start finds the finished run and does not train again
    again = train_tiny_vlm.main(["--out", str(out), "--size", "smoke", "--eval-examples", "1", "--no-progress"])
    assert again["steps"] == 3
