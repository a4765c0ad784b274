"""Parity with NVIDIA's reference code on the golden tiny checkpoint (tests/data/nld-tiny/golden).

Logits to float32 tolerance; greedy tokens and NFE exactly, in the three modes, with and
without the draft LoRA. The batch-1 cases are what a port with independent rows must match.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

import nld_jax
from nld_jax.decode import prefill
from nld_jax.kv_cache import KVCache

RTOL, ATOL = 1e-5, 1e-4  # float32; |logits| reach ~30


def _npz(golden_dir, name):
    return np.load(golden_dir / "golden" / name)


def test_causal_logits(tiny, golden_dir):
    a = _npz(golden_dir, "a_causal_logits.npz")
    logits = np.asarray(nld_jax.forward(tiny, a["input_ids"]))
    np.testing.assert_allclose(logits, a["logits"], rtol=RTOL, atol=ATOL)
    rel = np.abs(logits - a["logits"]).max() / np.abs(a["logits"]).max()
    assert rel < 1e-5


@pytest.mark.parametrize("which", ["block", "block2"])
def test_block_logits(tiny, golden_dir, which):
    a, b = _npz(golden_dir, "a_causal_logits.npz"), _npz(golden_dir, "b_diffusion_block.npz")
    logits = np.asarray(nld_jax.block_logits(tiny, a["input_ids"], b[f"{which}_ids"]))
    np.testing.assert_allclose(logits, b[f"{which}_logits"], rtol=RTOL, atol=ATOL)


def test_prefill_cache_and_last_logits(tiny, golden_dir):
    """Our KV cache after a causal prefill holds NVIDIA's post-RoPE keys and values."""
    a, b = _npz(golden_dir, "a_causal_logits.npz"), _npz(golden_dir, "b_diffusion_block.npz")
    ids = np.asarray(a["input_ids"], np.int32)
    B, P = ids.shape
    cache = KVCache.empty(tiny.config, B, P)
    cache, last = prefill(tiny.params, tiny.config, cache, ids, np.full((B,), P, np.int32))
    for n in range(tiny.config.num_hidden_layers):
        # golden layout [B, K, P, Dh]; ours [L, B, S, K, Dh]
        np.testing.assert_allclose(np.asarray(cache.k[n]).transpose(0, 2, 1, 3), b[f"cache_keys_layer{n}"],
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(cache.v[n]).transpose(0, 2, 1, 3), b[f"cache_values_layer{n}"],
                                   rtol=RTOL, atol=ATOL)
    logits = np.asarray(nld_jax.model.lm_head(tiny.params, tiny.config, last[:, 0]))
    np.testing.assert_allclose(logits, b["prefill_last_logits"], rtol=RTOL, atol=ATOL)


def _gen(tiny, case, mode, **kw):
    P = len(case["prompt_ids"][0])
    out = nld_jax.generate(tiny, case["prompt_ids"], mode=mode, **kw)
    expected = [row[P:] for row in case["output_ids"]]
    return out, expected


def _ids(cases, kind):
    return [f"{kind}-{i}" for i in range(len(cases[kind]))]


def test_ar_batch1(tiny, cases):
    for case in cases["d_ar_generate_b1"]:
        out, expected = _gen(tiny, case, "ar", max_new_tokens=case["max_new_tokens"])
        assert out.tokens == expected
        assert out.nfe == [case["nfe"]]


def test_diffusion_batch1(tiny, cases):
    for case in cases["e_generate_b1"]:
        out, expected = _gen(tiny, case, "diffusion", max_new_tokens=case["max_new_tokens"],
                             block_length=case["block_length"], threshold=case["threshold"])
        assert out.tokens == expected, (case["threshold"], case["prompt_ids"][0][:4])
        assert out.nfe == [case["nfe"]]


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_spec_batch1(tiny, cases, lora):
    runs = [c for c in cases["f_linear_spec"] if c["lora"] == lora]
    assert len(runs) == 6
    for case in runs:
        out, expected = _gen(tiny, case, "spec", max_new_tokens=case["max_new_tokens"],
                             block_length=case["block_length"], use_lora=lora)
        assert out.tokens == expected, (case["prompt_index"], case["block_length"])
        assert out.nfe == [case["nfe"]]
        # Accepted tokens per iteration, from the forward index that decided each token. The
        # reference records the last iteration before truncating after EOS, so compare it as <=.
        per_verify = collections.Counter(out.decided_at[0][1:])
        accepted = [per_verify[k] for k in sorted(per_verify)]
        golden = case["accepted_per_iteration"]
        assert accepted[:-1] == golden[:-1]
        assert 1 <= accepted[-1] <= golden[-1]


def test_diffusion_unmasking_trace(tiny, cases):
    """Tokens revealed per denoising forward, per row, equal NVIDIA's transfer_per_step trace.

    Both rows of the main batch run without EOS, where the reference's batch coupling is
    invisible, so the batched run must match the batched golden trace row by row.
    """
    for case in (c for c in cases["e_generate"] if c["prompts"] == "batch"):
        out, expected = _gen(tiny, case, "diffusion", max_new_tokens=48, block_length=8,
                             threshold=case["threshold"])
        assert out.tokens == expected
        for row in range(2):
            golden = [step[row] for step in case["transfer_per_step"] if step[row] > 0]
            # Seeds are decided by the prefill/commit forwards, one per block of 8.
            seeds = set(out.decided_at[row][::8])
            counts = collections.Counter(f for f in out.decided_at[row] if f not in seeds)
            assert [counts[k] for k in sorted(counts)] == golden


def test_batched_cases_match_batch1_rows(tiny, cases):
    """Batched AR and diffusion (both golden prompt batches) equal the reference's batch-1 runs."""
    ar_b1 = {tuple(c["prompt_ids"][0]): c for c in cases["d_ar_generate_b1"]}
    for case in cases["d_ar_generate"]:
        out = nld_jax.generate(tiny, case["prompt_ids"], mode="ar", max_new_tokens=48)
        for row, prompt in enumerate(case["prompt_ids"]):
            ref = ar_b1[tuple(prompt)]
            assert out.tokens[row] == ref["output_ids"][0][len(prompt):]
            assert out.nfe[row] == ref["nfe"]
    diff_b1 = collections.defaultdict(dict)
    for c in cases["e_generate_b1"]:
        diff_b1[c["threshold"]][tuple(c["prompt_ids"][0])] = c
    for case in cases["e_generate"]:
        out = nld_jax.generate(tiny, case["prompt_ids"], mode="diffusion", max_new_tokens=48, block_length=8,
                               threshold=case["threshold"])
        for row, prompt in enumerate(case["prompt_ids"]):
            ref = diff_b1[case["threshold"]][tuple(prompt)]
            assert out.tokens[row] == ref["output_ids"][0][len(prompt):]
            assert out.nfe[row] == ref["nfe"]
