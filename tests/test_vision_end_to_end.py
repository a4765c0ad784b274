"""Images in, logits and tokens out, against transformers' whole Mistral3 VLM on the same weights.

``tests/data/vlm-tiny/end_to_end.npz`` (``tests/golden_scripts/make_vlm_end_to_end_golden.py``):
transformers' Pixtral tower, Mistral3 projector, ``masked_scatter`` splice and Ministral3 decoder,
whose text path that script first checks against NVIDIA's own golden causal logits of nld-tiny
(max abs error 1.7e-5). Here: the prompt layout nld_jax builds from a placeholder prompt, its
causal logits with the images, and greedy tokens in every mode (``spec`` and ``spec_quadratic``
must give AR's tokens; ``diffusion`` has no transformers counterpart and is not compared).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import nld_jax
from nld_jax.vision.prompts import multimodal_prompts
from test_vision import _write_vlm  # noqa: F401  (the fixture's checkpoint writer)

VLM_DATA = pathlib.Path(__file__).resolve().parent / "data" / "vlm-tiny"
ATOL = 1e-4  # float32 logits of magnitude ~30 (measured: 1.5e-5), through a tower, a projector and two layers


@pytest.fixture(scope="module")
def end_to_end():
    with open(VLM_DATA / "end_to_end.json") as f:
        meta = json.load(f)
    with open(VLM_DATA / "cases.json") as f:
        modes = json.load(f)["modes"]
    arrays = dict(np.load(VLM_DATA / "end_to_end.npz"))
    images = dict(np.load(VLM_DATA / "golden.npz"))
    cases = []
    for c, case in enumerate(meta["cases"]):
        pictures = [Image.fromarray(images[f"image{i}"], modes[i]) for i in case["images"]]
        cases.append((case["prompt"], pictures, arrays[f"ids{c}"].tolist(), arrays[f"logits{c}"],
                      arrays[f"greedy{c}"].tolist()))
    return cases


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return nld_jax.load(_write_vlm(tmp_path_factory.mktemp("vlm-e2e") / "nld-vlm-tiny"), dtype="float32")


def test_prompt_layout_is_transformers(vlm, end_to_end):
    vc = vlm.vision_config
    for prompt, pictures, ids, _, _ in end_to_end:
        placed, _ = multimodal_prompts(vlm.vision, vc, vlm.params, [prompt], [pictures], vlm.tokenizer.bos_id, 128)
        assert placed[0] == ids


def test_causal_logits_with_images_match_transformers(vlm, end_to_end):
    for prompt, pictures, ids, logits, _ in end_to_end:
        ours = np.asarray(nld_jax.forward(vlm, [ids], images=[pictures]))[0]
        assert ours.shape == logits.shape
        np.testing.assert_allclose(ours, logits, atol=ATOL, rtol=0)
        assert (ours.argmax(-1) == logits.argmax(-1)).all()


@pytest.mark.parametrize("mode", ["ar", "spec", "spec_quadratic"])
def test_greedy_tokens_with_images_match_transformers(vlm, end_to_end, mode):
    prompts = [p for p, *_ in end_to_end]
    images = [pictures for _, pictures, *_ in end_to_end]
    want = [greedy for *_, greedy in end_to_end]
    out = nld_jax.generate(vlm, prompts, images=images, mode=mode, max_new_tokens=len(want[0]),
                           **({} if mode == "ar" else {"block_length": 4}))
    assert [tokens[:len(w)] for tokens, w in zip(out.tokens, want)] == want
