"""Decode-mode invariants that hold for any weights (checked on the golden tiny model)."""

from __future__ import annotations

import dataclasses

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.programs import PROGRAMS
from nld_jax.attention import BlockPattern
from nld_jax.decode import prefill
from nld_jax.kv_cache import KVCache
from nld_jax.decode.listeners import TokenStream
from nld_jax.model import forward_hidden, forward_logits, lm_head
from nld_jax.sharding import mesh_from_spec, shard_model


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


@pytest.mark.parametrize("block_length", [3, 32] + [pytest.param(C, marks=pytest.mark.slow) for C in (2, 8, 16)])
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


def test_rows_with_eos_stop_independently(tiny, cases):
    """The EOS batch: row 0 ends at 25 tokens in AR; row 1 runs to the budget; NFE per row."""
    prompts = cases["prompts"]["eos_batch"]["ids"]
    out = nld_jax.generate(tiny, prompts, mode="ar", max_new_tokens=48)
    assert [len(t) for t in out.tokens] == [25, 48]
    assert out.tokens[0][-1] == tiny.config.eos_token_id and tiny.config.eos_token_id not in out.tokens[1]
    assert out.nfe == [25, 48]


def _eos_prompts(cases):
    """Four ragged prompts (12, 60, 58 and 55 tokens) whose rows end at different times.

    Found by a throwaway search (not kept): every golden prompt, its prefixes of 9..30 tokens and
    the prompt extended by the first k tokens of its greedy AR continuation (k = 0..64 - length)
    were run in every mode at max_new_tokens=32, block_length=8, and the first EOS of each row
    recorded; these four give EOS at different steps in every mode and one row without EOS. The
    extensions are NVIDIA's own greedy continuations from the golden cases, so for rows 1 and 2
    the AR tokens up to the EOS are NVIDIA's too (returned as ``golden``)."""
    eos0, eos1 = cases["prompts"]["eos_batch"]["ids"]
    ar = {tuple(c["prompt_ids"][0]): c["output_ids"][0] for c in cases["d_ar_generate_b1"]}  # prompt + 48 or to EOS
    spec_eos = next(c for c in cases["f_linear_spec"] if c["prompt_kind"] == "eos")["output_ids"][0]  # to EOS
    prompts = [eos1[:12], ar[tuple(eos0)][:60], spec_eos[:58], ar[tuple(eos1)][:55]]
    golden = {1: ar[tuple(eos0)][60:], 2: spec_eos[58:]}
    return prompts, golden


EOS_BUDGET = 20  # not a multiple of the block: the last diffusion block is partly decodable
# Length of each row's output when it ends with EOS (None: no EOS within the budget), measured:
# greedy AR, spec and spec_quadratic (equal to AR), and diffusion (blocks of 8: row 3 finishes
# inside its first block, row 2 inside its second, rows 0 and 1 run all three).
EOS_AT = {"ar": [15, 5, 18, None], "diffusion": [None, None, 12, 5]}
EOS_VARIANTS = [("ar", {}), ("diffusion", {"threshold": 0.9}), ("diffusion", {"threshold": None}), ("spec", {}),
                ("spec", {"use_lora": True}), ("spec_quadratic", {})]


EOS_IDS = ["ar", "diffusion-threshold", "diffusion-topk", "spec", "spec-lora", "spec_quadratic"]
SLOW_EOS_IDS = ("ar", "diffusion-topk", "spec")  # run in the slow step; the other three in the default suite


@pytest.mark.parametrize("mode,kw", [pytest.param(*v, id=name, marks=[pytest.mark.slow] if name in SLOW_EOS_IDS else [])
                                     for v, name in zip(EOS_VARIANTS, EOS_IDS)])
def test_ragged_rows_stopping_at_different_times_equal_alone(tiny, cases, mode, kw):
    """A batch of ragged prompts whose rows stop at different steps (EOS, or the budget): each row
    equals the same prompt alone (tokens and NFE), its EOS is where the measured run put it, and
    the streamer (``on_tokens``) delivers exactly the returned tokens, cut after the EOS (a
    diffusion block commits tokens past its EOS, which must not reach the listener).

    (It replaces test_ragged_batch_rows_equal_batch1 and test_streaming_delivers_exactly_the_result,
    which checked the same on prompts that never met EOS.)"""
    prompts, golden = _eos_prompts(cases)
    eos = tiny.config.eos_token_id
    streamed = [[] for _ in prompts]
    batch = nld_jax.generate(tiny, prompts, mode=mode, max_new_tokens=EOS_BUDGET, block_length=8,
                             on_tokens=lambda row, ids: streamed[row].extend(ids), **kw)
    ends = [len(t) if t[-1] == eos else None for t in batch.tokens]
    assert ends == EOS_AT["diffusion" if mode == "diffusion" else "ar"], ends
    assert all(eos not in t[:-1] for t in batch.tokens)
    assert all(len(t) >= EOS_BUDGET for t, end in zip(batch.tokens, ends) if end is None)
    if mode != "diffusion":  # greedy AR (and spec, which equals it): NVIDIA's tokens up to the EOS
        for row, want in golden.items():
            assert batch.tokens[row] == want, row
    assert streamed == batch.tokens
    for row, prompt in enumerate(prompts):
        alone = nld_jax.generate(tiny, [prompt], mode=mode, max_new_tokens=EOS_BUDGET, block_length=8, **kw)
        assert alone.tokens[0] == batch.tokens[row], (mode, row)
        assert alone.nfe[0] == batch.nfe[row], (mode, row)
    if mode == "diffusion":  # the rows that finished blocks early did not keep running
        assert batch.nfe[3] < batch.nfe[2] < min(batch.nfe[:2]), batch.nfe


def _two_rows(C: int, W: int, phase: int, blk, eos: int):
    """Rows and a live Track of two rows (block length C, width W) in ``phase``, holding ``blk``."""
    from nld_jax.decode import Rows, Track

    z = jnp.zeros((2,), jnp.int32)
    rows = Rows(mode=z, block_length=z + C, max_new_tokens=z + 99, temperature=jnp.zeros((2,)),
                threshold=jnp.full((2,), 0.9), use_threshold=jnp.zeros((2,), bool), top_p=jnp.ones((2,)), top_k=z,
                use_lora=jnp.zeros((2,), bool), key=jnp.zeros((2, 2), jnp.uint32), stop_ids=jnp.full((2, 1), eos))
    track = dataclasses.replace(Track.empty(2, 32, W), done=jnp.zeros((2,), bool), n=z + 1, nfe=z + 1,
                                phase=z + phase, blk=jnp.asarray(blk, jnp.int32), block_masks=z + C - 1)
    return rows, track


@pytest.mark.parametrize("eos_row", [0, 1])
def test_a_rows_stop_never_stops_its_neighbour(tiny, eos_row):
    """Each mode's step logic on two rows in the same phase, one of which meets EOS: that row
    stops (or, denoising, ends its block), the other does not. Phases are aligned here on
    purpose: in a real batch a diffusion row's EOS commit rarely falls on a neighbour's commit."""
    from nld_jax.decode import diffusion, spec, spec_quadratic
    from nld_jax.decode.loop import MODE_LOGIC
    from nld_jax.decode.sampling import Decision

    config, eos, mask = tiny.config, tiny.config.eos_token_id, tiny.config.mask_token_id
    C = 4
    other = 1 - eos_row
    expected = np.arange(2) == eos_row

    def decision(tokens):
        tokens = jnp.asarray(tokens, jnp.int32)
        conf = jnp.ones(tokens.shape, jnp.float32)
        return Decision(tokens, conf, conf)

    def with_eos(plain, at):  # row eos_row gets EOS at slot ``at``
        rows = [list(plain), list(plain)]
        rows[eos_row][at] = eos
        return rows

    # AR: the sampled token is the row's next token
    rows, track = _two_rows(C, 1, 0, [[5], [5]], eos)
    tok = [[7], [7]]
    tok[eos_row][0] = eos
    new, _ = MODE_LOGIC["ar"].advance(rows, track, None, decision(tok), config)
    assert (np.asarray(new.done) == expected).all(), "ar"
    # diffusion COMMIT of a block with an EOS in one row
    rows, track = _two_rows(C, C, diffusion.COMMIT, with_eos([5, 6, 7, 8], 2), eos)
    new, _ = diffusion.advance(rows, track, None, decision([[9] * C] * 2), config)
    assert (np.asarray(new.done) == expected).all(), "diffusion commit"
    # diffusion DENOISE unmasking an EOS with no mask before it: that row's block ends early
    rows, track = _two_rows(C, C, diffusion.DENOISE, [[5, mask, mask, mask]] * 2, eos)
    new, _ = diffusion.advance(rows, track, None, decision(with_eos([0, 6, 7, 8], 1)), config)
    assert (np.asarray(new.stopped) == expected).all(), "diffusion denoise"
    assert (np.asarray(new.phase) == np.where(expected, diffusion.COMMIT, diffusion.DENOISE)).all()
    # spec VERIFY: the EOS is among the accepted tokens of one row
    rows, track = _two_rows(C, C, spec.VERIFY, [[5, 6, 7, 8]] * 2, eos)
    new, _ = spec.advance(rows, track, None, decision(with_eos([6, 7, 8, 9], 1)), config)
    assert (np.asarray(new.done) == expected).all(), "spec verify"
    # spec_quadratic QUAD: the same, through the verify part of the structured block
    W = spec_quadratic.width_for(C)
    rows, track = _two_rows(C, W, spec_quadratic.QUAD, [[5, 6, 7, 8] + [mask] * (W - C)] * 2, eos)
    new, _ = spec_quadratic.advance(rows, track, None, decision(with_eos([6, 7, 8, 9] + [10] * (W - C), 1)), config)
    assert (np.asarray(new.done) == expected).all(), "spec_quadratic"
    assert not bool(new.done[other])


def test_token_stream_cuts_each_row_after_its_first_stop_id():
    """The listener on its own: snapshots of a growing buffer, stop ids mid-chunk, tokens after
    them (a committed diffusion block) and later snapshots of a finished row."""
    got = []
    stream = TokenStream(lambda row, ids: got.append((row, ids)), stop_ids=[2, 9, None, -1])
    out = np.asarray([[5, 6, 2, 7, 8, 2, 0, 0],
                      [5, 6, 7, 8, 9, 2, 4, 0],
                      [5, 6, 7, 8, 4, 4, 4, 4]])
    stream(out, np.asarray([4, 2, 3]))  # row 0: EOS inside the chunk, a token after it
    stream(out, np.asarray([6, 6, 3]))  # row 0 finished: nothing more; row 1 stops at its stop id 9
    stream(out, np.asarray([8, 7, 8]))
    assert got == [(0, [5, 6, 2]), (1, [5, 6]), (2, [5, 6, 7]), (1, [7, 8, 9]), (2, [8, 4, 4, 4, 4])]


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
    # the counter does see compilations: a prompt in the next bucket needs a new program (the
    # suite may have compiled it already: start from an empty program cache)
    PROGRAMS.clear()
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


SAMPLED = 24  # tokens per sampled row (the budget of the seeded tests)


@pytest.fixture(scope="module")
def data2_model(tiny):
    """The golden model on a 2-device mesh (rows over ``data``: one row per device)."""
    return shard_model(tiny, mesh_from_spec("data=2"))


@pytest.mark.parametrize("mode", [pytest.param("ar", marks=pytest.mark.slow), "diffusion", "spec", "spec_quadratic"])
def test_sampling_is_seeded(tiny, cases, data2_model, mode):
    """``generate``'s promise (its docstring): row b samples with ``seed + b`` (or ``seed[b]``) and
    samples what it samples alone with that seed. So: the same seed gives the same tokens, another
    seed other tokens in every row, each row of a batch equals the row alone (and its place in the
    batch does not matter), and a mesh that splits the rows over devices changes nothing."""
    prompts = [cases["prompts"]["batch"]["ids"][0][:30], cases["prompts"]["spec"][2]["ids"][:19]]  # one bucket

    def run(model, rows, seed):
        return nld_jax.generate(model, rows, mode=mode, max_new_tokens=SAMPLED, block_length=4, temperature=1.0,
                                seed=seed).tokens

    a = run(tiny, prompts, 11)  # rows use seeds 11 and 12
    assert all(len(t) >= SAMPLED or t[-1] == tiny.config.eos_token_id for t in a)
    assert run(tiny, prompts, 11) == a
    assert run(tiny, prompts, [11, 12]) == a  # an int seed is seed + b per row
    other = run(tiny, prompts, [21, 31])
    for row in range(2):
        assert other[row] != a[row], f"row {row}: another seed sampled the same tokens"
    # a row's sample depends on its prompt and seed only: not on its neighbour, nor on its place
    assert run(tiny, prompts[::-1], [12, 11]) == a[::-1]
    for row, prompt in enumerate(prompts):
        assert run(tiny, [prompt], 11 + row) == [a[row]], f"row {row} differs from the same prompt alone"
    # under a mesh each device holds one row (and draws that row's noise)
    assert run(data2_model, prompts, 11) == a


BF16_STEPS = 32  # greedy tokens compared between bfloat16 and float32


@pytest.mark.slow
def test_bfloat16_model_runs_and_tracks_float32(golden_dir, tiny, cases):
    """Logits within bounds set from measured values, and greedy tokens equal float32's over
    BF16_STEPS steps. Float32's tokens are NVIDIA's float32 reference outputs (the golden batch-1
    cases, which the float32 model matches token for token in test_golden_parity.py)."""
    bf16 = nld_jax.load(golden_dir, dtype="bfloat16")
    assert bf16.params["embed_tokens"].dtype == jnp.bfloat16
    ids = cases["prompts"]["batch"]["ids"]  # 2 x 40 tokens
    lf = np.asarray(nld_jax.forward(tiny, ids))
    lb = np.asarray(nld_jax.forward(bf16, ids))
    assert lb.dtype == np.float32
    # Measured (XLA:CPU): max |lb - lf| 0.338 (1.1% of max |lf| = 31.2), mean 0.0254; the bounds
    # are ~1.5x that. A bf16 path that loses a norm or a residual is off by whole units.
    err = np.abs(lb - lf)
    assert err.max() < 0.5 and err.mean() < 0.04, (err.max(), err.mean())
    # Measured: argmax equal at 78 of 80 positions; the two others are near ties in float32 (top-2
    # gaps 0.019 and 0.039). Every disagreement must be such a tie (gap < 0.1).
    agree = lb.argmax(-1) == lf.argmax(-1)
    top2 = np.sort(lf, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    assert agree.mean() >= 0.95 and (agree | (gap < 0.1)).all(), (agree.mean(), gap[~agree])
    # Greedy tokens: measured equal to float32's through 48 tokens in AR, spec and spec_quadratic on
    # both rows; in diffusion row 1 too, while row 0 departs at token 2 (a near tie among the first
    # block's confidences), so only row 1 is compared there. (spec_quadratic left out: one program less.)
    ar = {tuple(c["prompt_ids"][0]): c["output_ids"][0][40:40 + BF16_STEPS] for c in cases["d_ar_generate_b1"]}
    diffusion = {tuple(c["prompt_ids"][0]): c["output_ids"][0][40:40 + BF16_STEPS] for c in cases["e_generate_b1"]
                 if c["threshold"] == 0.9}
    for mode, want, rows in (("ar", ar, (0, 1)), ("spec", ar, (0, 1)), ("diffusion", diffusion, (1,))):
        out = nld_jax.generate(bf16, ids, mode=mode, max_new_tokens=BF16_STEPS, block_length=8, threshold="auto")
        for row in rows:
            assert out.tokens[row][:BF16_STEPS] == want[tuple(ids[row])], (mode, row)
