"""Quadratic self-speculation: the structured block is what the tech report describes, and greedy
output equals greedy AR token for token (golden and random models, several block lengths,
batched and alone, with and without the draft LoRA)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.decode import DecodeOptions, Rows, Track
from nld_jax.decode import spec_quadratic as quad

MAX_NEW = 40


def _prompts(cases):
    return [p["ids"][:n] for p, n in zip(cases["prompts"]["spec"], (24, 9, 17))] + \
        [cases["prompts"]["eos_batch"]["ids"][0]]  # this one meets EOS inside an accepted run


def _rows(C: int, B: int = 1) -> Rows:
    z = jnp.zeros((B,), jnp.int32)
    return Rows(mode=z, block_length=jnp.full((B,), C, jnp.int32), max_new_tokens=z + 99,
                temperature=jnp.zeros((B,)), threshold=jnp.zeros((B,)), use_threshold=jnp.zeros((B,), bool),
                top_p=jnp.ones((B,)), top_k=z, use_lora=jnp.ones((B,), bool), key=jnp.zeros((B, 2), jnp.uint32),
                stop_ids=jnp.full((B, 1), -1, jnp.int32))


@pytest.mark.parametrize("C", [2, 3, 4])
def test_the_quad_block_is_the_reports_structure(C):
    """Visibility, positions and LoRA of a QUAD forward, checked against the description written
    out by hand: the seed and drafts causal; group j (C masks at the positions after d_j) sees
    s, d_1..d_j and itself, nothing else of the block; padding sees itself."""
    W = quad.width_for(C) + 3  # a wider program: the last 3 slots are padding
    track = Track.empty(1, 8, W)
    track = track.__class__(**{**track.__dict__, "phase": jnp.full((1,), quad.QUAD, jnp.int32), "done": jnp.zeros((1,), bool)})
    req = quad.request(_rows(C), track, nld_jax.NLDConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
                                                         num_hidden_layers=1, num_attention_heads=1,
                                                         num_key_value_heads=1, head_dim=8, mask_token_id=3))
    visible = np.asarray(req.pattern.visible())[0]
    offsets = np.asarray(req.offsets)[0]
    lora = np.asarray(req.lora)[0]
    for t in range(W):
        if t < C:  # verify part: causal
            want, pos, lo = [u <= t for u in range(W)], t, False
        elif t < C + C * C:
            j, slot = divmod(t - C, C)
            members = range(C + j * C, C + (j + 1) * C)
            want = [u <= j or u in members for u in range(W)]
            pos, lo = j + 1 + slot, True
        else:
            want, pos, lo = [u == t for u in range(W)], None, False
        assert list(visible[t]) == want, t
        if pos is not None:
            assert offsets[t] == pos, t
        assert lora[t] == lo, t
    assert bool(req.write[0])  # the verify part goes to the cache (rolled back to what is accepted)


# Two of the six cases in the default suite, the other four in the slow step (each compiles its own programs).
@pytest.mark.parametrize("C, use_lora", [(4, False), (8, True), pytest.param(2, False, marks=pytest.mark.slow),
                                         pytest.param(8, False, marks=pytest.mark.slow),
                                         pytest.param(2, True, marks=pytest.mark.slow),
                                         pytest.param(4, True, marks=pytest.mark.slow)])
def test_greedy_quadratic_equals_greedy_ar(tiny, cases, C, use_lora):
    prompts = _prompts(cases)
    ar = nld_jax.generate(tiny, prompts, mode="ar", max_new_tokens=MAX_NEW)
    q = nld_jax.generate(tiny, prompts, mode="spec_quadratic", max_new_tokens=MAX_NEW, block_length=C,
                         use_lora=use_lora)
    for row, (got, want) in enumerate(zip(q.tokens, ar.tokens)):
        if want[-1] == tiny.config.eos_token_id:
            assert got == want, row  # both stop at the same EOS
        else:
            assert len(got) >= MAX_NEW and got[:MAX_NEW] == want, row  # may overshoot, like spec
    assert any(t[-1] == tiny.config.eos_token_id for t in q.tokens)  # the EOS branch is exercised
    # Batched rows equal the same rows alone.
    for row, p in enumerate(prompts):
        alone = nld_jax.generate(tiny, [p], mode="spec_quadratic", max_new_tokens=MAX_NEW, block_length=C,
                                 use_lora=use_lora)
        assert alone.tokens[0] == q.tokens[row] and alone.nfe[0] == q.nfe[row], row


@pytest.mark.slow
def test_quadratic_accepts_at_least_linear_spec_per_forward(tiny, cases):
    """Each QUAD forward both verifies and drafts, so for the same draft length it needs fewer
    forwards than linear spec (draft + verify): on the golden prompts at least 1.2x the TPF."""
    prompts = _prompts(cases)[:3]
    for C in (4, 8):
        lin = nld_jax.generate(tiny, prompts, mode="spec", max_new_tokens=MAX_NEW, block_length=C)
        q = nld_jax.generate(tiny, prompts, mode="spec_quadratic", max_new_tokens=MAX_NEW, block_length=C)
        assert np.mean(q.tpf) >= 1.2 * np.mean(lin.tpf), (C, q.tpf, lin.tpf)


def test_greedy_quadratic_equals_ar_on_a_random_model():
    config = nld_jax.NLDConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                               mask_token_id=3, bos_token_id=1, eos_token_id=2, block_size=8)
    model = nld_jax.random_model(config, seed=7, lora_rank=4, std=0.3)  # drafts are mostly rejected here
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 300, n).tolist() for n in (5, 30, 17)]
    ar = nld_jax.generate(model, prompts, mode="ar", max_new_tokens=48)
    for C in (3, 6):
        q = nld_jax.generate(model, prompts, mode="spec_quadratic", max_new_tokens=48, block_length=C, use_lora=True)
        assert [t[:48] for t in q.tokens] == ar.tokens, C


def test_full_acceptance_takes_a_whole_group():
    """A model that predicts one token everywhere (every embedding shares one direction, which
    the head maps to token 7): every draft is accepted, so each QUAD forward emits C tokens and
    the next drafts come from the last group (j = C - 1)."""
    config = nld_jax.NLDConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                               mask_token_id=3, bos_token_id=1, eos_token_id=2, block_size=4)
    model = nld_jax.random_model(config, seed=1, std=0.01)
    shared = jnp.zeros((32,)).at[0].set(1.0)
    params = dict(model.params, embed_tokens=model.params["embed_tokens"] + shared,
                  diffusion_head=jnp.zeros((32, 64)).at[0, 7].set(10.0))
    model = model.__class__(config, params)
    out = nld_jax.generate(model, [[1, 9, 12]], mode="spec_quadratic", max_new_tokens=33, block_length=4)
    assert out.tokens[0][:33] == [7] * 33
    # prefill (first token) + 1 draft + ceil(32 / 4) QUAD forwards, each accepting all 3 drafts + the bonus
    assert out.nfe[0] == 1 + 1 + 8


def test_interpreted_kernel_decodes_quadratic_like_xla(tiny, cases):
    prompts = _prompts(cases)[:2]
    runs = [nld_jax.generate(tiny, prompts, mode="spec_quadratic", max_new_tokens=24, block_length=4,
                             implementation=impl) for impl in ("xla", "pallas_interpret")]
    assert runs[0].tokens == runs[1].tokens and runs[0].nfe == runs[1].nfe


def test_options_and_context():
    options = DecodeOptions(mode="spec_quadratic", max_new_tokens=16, block_length=8)
    assert options.width == 72
    assert quad.block_for(options.width) == 8 and quad.width_for(8) == 72
    with pytest.raises(ValueError, match="block_length >= 2"):
        DecodeOptions(mode="spec_quadratic", block_length=1)
