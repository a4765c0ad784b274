"""Decode-mode invariants that hold for any weights (checked on the golden tiny model)."""

from __future__ import annotations

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.attention import BlockPattern
from nld_jax.decode import prefill
from nld_jax.kv_cache import KVCache
from nld_jax.model import forward_hidden, forward_logits, lm_head


def _prompts(cases):
    batch = cases["prompts"]["batch"]["ids"]
    spec = [p["ids"] for p in cases["prompts"]["spec"]]
    # ragged: 40, 24, 17 and 9 tokens
    return [batch[0], spec[0], batch[1][:17], spec[2][:9]]


def test_ar_with_cache_equals_one_forward(tiny, cases):
    """Logits of step-by-step cached decoding equal those of one forward over the whole sequence."""
    prompt = np.asarray(cases["prompts"]["batch"]["ids"], np.int32)  # [2, 40]
    out = nld_jax.generate(tiny, prompt.tolist(), mode="ar", max_new_tokens=12)
    full = np.concatenate([prompt, np.asarray(out.tokens, np.int32)], axis=1)  # [2, 52]
    reference = np.asarray(forward_logits(tiny.params, tiny.config, jnp.asarray(full)))

    B, P = prompt.shape
    cache = KVCache.empty(tiny.config, B, full.shape[1])
    cache, last = prefill(tiny.params, tiny.config, cache, jnp.asarray(prompt), jnp.full((B,), P, jnp.int32))
    stepped = [lm_head(tiny.params, tiny.config, last[:, 0])]
    for t in range(P, full.shape[1] - 1):
        hidden, k, v = forward_hidden(tiny.params, tiny.config, jnp.asarray(full[:, t:t + 1]), cache,
                                      pattern=BlockPattern.causal(B, 1))
        cache = cache.write(k, v).advance(jnp.ones((B,), jnp.int32))
        stepped.append(lm_head(tiny.params, tiny.config, hidden[:, 0]))
    stepped = np.stack([np.asarray(s) for s in stepped], axis=1)  # logits predicting tokens P..end
    np.testing.assert_allclose(stepped, reference[:, P - 1:-1], rtol=1e-5, atol=1e-4)
    # and the greedy tokens are the argmax of the uncached logits
    assert (reference[:, P - 1:-1].argmax(-1) == full[:, P:]).all()


@pytest.mark.parametrize("block_length", [2, 3, 8, 16, 32])
def test_greedy_spec_equals_greedy_ar(tiny, cases, block_length):
    prompts = _prompts(cases)
    ar = nld_jax.generate(tiny, prompts, mode="ar", max_new_tokens=40)
    for use_lora in (False, True):
        spec = nld_jax.generate(tiny, prompts, mode="spec", max_new_tokens=40, block_length=block_length,
                                use_lora=use_lora)
        for row in range(len(prompts)):
            n = min(len(ar.tokens[row]), len(spec.tokens[row]))
            assert spec.tokens[row][:n] == ar.tokens[row][:n]
            # spec keeps its last accepted run whole (as the reference), so it may run past the
            # budget by < block_length tokens, but never stops early unless it hit EOS
            assert len(spec.tokens[row]) >= len(ar.tokens[row]) or spec.tokens[row][-1] == tiny.config.eos_token_id


def test_greedy_spec_with_threshold_equals_greedy_ar(tiny, cases):
    prompts = _prompts(cases)
    ar = nld_jax.generate(tiny, prompts, mode="ar", max_new_tokens=30)
    spec = nld_jax.generate(tiny, prompts, mode="spec", max_new_tokens=30, block_length=8, threshold=0.5)
    for a, s in zip(ar.tokens, spec.tokens):
        assert s[:len(a)] == a[:len(s)]
    plain = nld_jax.generate(tiny, prompts, mode="spec", max_new_tokens=30, block_length=8)
    # iterative drafting costs extra draft forwards (each at least one token)
    assert all(t >= p for t, p in zip(spec.nfe, plain.nfe))


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("diffusion", {"threshold": 0.9}), ("diffusion", {"threshold": None}),
                                     ("spec", {}), ("spec", {"use_lora": True})])
def test_ragged_batch_rows_equal_batch1(tiny, cases, mode, kw):
    prompts = _prompts(cases)
    batch = nld_jax.generate(tiny, prompts, mode=mode, max_new_tokens=24, block_length=8, **kw)
    for row, prompt in enumerate(prompts):
        alone = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=24, block_length=8, **kw)
        assert batch.tokens[row] == alone.tokens[0], (mode, row)
        assert batch.nfe[row] == alone.nfe[0], (mode, row)


def test_rows_with_eos_stop_independently(tiny, cases):
    """The EOS batch: row 0 ends at 25 tokens in AR; row 1 runs to the budget; NFE per row."""
    prompts = cases["prompts"]["eos_batch"]["ids"]
    out = nld_jax.generate(tiny, prompts, mode="ar", max_new_tokens=48)
    assert [len(t) for t in out.tokens] == [25, 48]
    assert out.tokens[0][-1] == tiny.config.eos_token_id and tiny.config.eos_token_id not in out.tokens[1]
    assert out.nfe == [25, 48]


def _count_compiles(fn):
    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_same_bucket_compiles_nothing_new(tiny, cases):
    prompt = cases["prompts"]["batch"]["ids"][0]
    for mode in ("ar", "diffusion", "spec"):
        nld_jax.generate(tiny, [prompt[:20]], mode=mode, max_new_tokens=16, block_length=8)
        again = _count_compiles(lambda: nld_jax.generate(tiny, [prompt[:27]], mode=mode, max_new_tokens=16,
                                                         block_length=8, seed=3))
        assert again == 0, mode
    # the counter does see compilations: a prompt in the next bucket needs a new program
    assert _count_compiles(lambda: nld_jax.generate(tiny, [prompt[:33]], mode="ar", max_new_tokens=16)) > 0


def test_threshold_and_temperature_values_do_not_recompile(tiny, cases):
    prompt = cases["prompts"]["batch"]["ids"][0]
    nld_jax.generate(tiny, [prompt], mode="diffusion", max_new_tokens=16, block_length=8, threshold=0.9,
                     temperature=0.7)
    assert _count_compiles(lambda: nld_jax.generate(tiny, [prompt], mode="diffusion", max_new_tokens=16,
                                                    block_length=8, threshold=0.5, temperature=1.3,
                                                    seed=5)) == 0


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_max_new_tokens_not_a_multiple_of_the_block(tiny, cases, mode):
    prompt = cases["prompts"]["batch"]["ids"][0]  # this prompt runs 48 tokens without EOS
    schedule = {"threshold": None} if mode == "diffusion" else {}  # NVIDIA's top-k schedule
    out = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=13, block_length=8, **schedule)
    longer = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=16, block_length=8, **schedule)
    if mode == "spec":  # may overshoot by < block_length, like the reference
        assert 13 <= len(out.tokens[0]) < 13 + 8
        assert out.tokens[0] == longer.tokens[0][:len(out.tokens[0])]
    else:
        assert len(out.tokens[0]) == 13
        # the first block is computed identically; AR is a prefix of any longer AR run
        n = 13 if mode == "ar" else 8
        assert out.tokens[0][:n] == longer.tokens[0][:n]
    if mode == "diffusion":  # 2 blocks: 7 + 4 denoising steps and 2 commits without threshold
        assert out.nfe[0] == 7 + 4 + 2


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_sampling_is_seeded(tiny, cases, mode):
    prompt = cases["prompts"]["spec"][0]["ids"]
    a = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=24, block_length=8, temperature=1.0, seed=1)
    b = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=24, block_length=8, temperature=1.0, seed=1)
    c = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=24, block_length=8, temperature=1.0, seed=2)
    greedy = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=24, block_length=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens or a.tokens != greedy.tokens
    assert all(0 <= t < tiny.config.vocab_size for t in a.tokens[0])


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_streaming_delivers_exactly_the_result(tiny, cases, mode):
    prompts = _prompts(cases)[:2]
    got = {0: [], 1: []}
    out = nld_jax.generate(tiny, prompts, mode=mode, max_new_tokens=20, block_length=8,
                           on_tokens=lambda row, ids: got[row].extend(ids))
    assert [got[0], got[1]] == out.tokens


def test_bfloat16_model_runs_and_tracks_float32(golden_dir, tiny, cases):
    bf16 = nld_jax.load(golden_dir, dtype="bfloat16")
    assert bf16.params["embed_tokens"].dtype == jnp.bfloat16
    ids = cases["prompts"]["batch"]["ids"]
    lf = np.asarray(nld_jax.forward(tiny, ids))
    lb = np.asarray(nld_jax.forward(bf16, ids))
    assert lb.dtype == np.float32
    # bf16 keeps ~3 significant digits through 2 layers
    assert np.abs(lb - lf).max() < 0.05 * np.abs(lf).max()
    assert (lb.argmax(-1) == lf.argmax(-1)).mean() > 0.9
    for mode in ("ar", "diffusion", "spec"):
        out = nld_jax.generate(bf16, ids, mode=mode, max_new_tokens=16, block_length=8)
        assert all(len(t) >= 1 for t in out.tokens)
