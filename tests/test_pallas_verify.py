"""The fused greedy LM head (argmax + confidence, no ``[..., V]`` logits) and the verify step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nld_jax.decode.spec import accepted_length
from nld_jax.model import greedy_head_xla
from pallas_kernels.testing import COMPILED, INTERPRETED, assert_close
from pallas_kernels.verify import api
from pallas_kernels.verify.kernel_tpu import TpuHeadSizes, merge_head_partials
from pallas_kernels.verify.kernel_triton import TritonHeadSizes
from pallas_kernels.verify.reference import greedy_head_reference

# Small tiles: several vocabulary tiles per split, uneven splits, a ragged last tile.
SIZES = {
    "pallas_interpret": TpuHeadSizes(block_rows=16, block_v=128, num_splits=3),
    "pallas_tpu": TpuHeadSizes(block_rows=16, block_v=128, num_splits=3),
    "pallas_triton_interpret": TritonHeadSizes(block_rows=16, block_v=64, block_d=32, num_splits=5),
    "pallas_triton": TritonHeadSizes(block_rows=16, block_v=64, block_d=32, num_splits=5),
    "pallas_mosaic_gpu": TritonHeadSizes(block_rows=16, block_v=64, block_d=32, num_splits=5),
}

# (leading shape, D, V, dtype): a verify block (C in 1, 8, 16, 32), AR rows, odd vocabularies.
CASES = [((2, 8), 64, 1000, jnp.float32), ((3, 1), 96, 515, jnp.bfloat16), ((1, 32), 64, 2048, jnp.bfloat16),
         ((2, 16), 128, 777, jnp.float32), ((5,), 64, 300, jnp.float32)]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _head_inputs(key, lead, D, V, dtype):
    kh, kw = jax.random.split(key)
    hidden = jax.random.normal(kh, (*lead, D), jnp.float32).astype(dtype)
    return hidden, (jax.random.normal(kw, (D, V), jnp.float32) / D ** 0.25).astype(dtype)


@jax.jit
def _reference(hidden, weight):
    with jax.default_matmul_precision("highest"):
        tokens, prob = greedy_head_reference(hidden, weight)
        return tokens, prob, jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)


def _check(impl, case, seed):
    lead, D, V, dtype = case
    hidden, weight = _head_inputs(jax.random.key(seed), lead, D, V, jnp.dtype(dtype))
    head = functools.partial(api.greedy_head, implementation=impl, sizes=SIZES[impl], poison=True)
    tokens, prob = jax.jit(head)(hidden, weight)
    ref_tokens, ref_prob, logits = _reference(hidden, weight)
    assert tokens.shape == lead and tokens.dtype == jnp.int32 and prob.dtype == jnp.float32
    # Summation order may flip a near-tie: accept any token whose logit is within rounding of the max.
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_array_less(np.asarray(jnp.max(logits, -1) - chosen), 1e-3)
    assert np.mean(np.asarray(tokens == ref_tokens)) > 0.9
    assert_close(prob, ref_prob, jnp.float32, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_head_matches_reference(impl, case):
    _check(impl, case, CASES.index(case))


@pytest.mark.slow
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_head_more_shapes(impl):
    for case in CASES[3:]:
        _check(impl, case, CASES.index(case))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", COMPILED)
def test_compiled_head_matches_reference(impl, case):
    _check(impl, case, CASES.index(case))


@pytest.mark.parametrize("impl", INTERPRETED)
def test_ties_resolve_to_the_first_token(impl):
    # Every logit equal: argmax is token 0 and its probability 1/V, across tiles and splits.
    hidden = jnp.ones((3, 64), jnp.float32)
    weight = jnp.zeros((64, 700), jnp.float32)
    tokens, prob = api.greedy_head(hidden, weight, implementation=impl, sizes=SIZES[impl])
    np.testing.assert_array_equal(tokens, 0)
    np.testing.assert_allclose(prob, 1 / 700, rtol=1e-6)
    weight = weight.at[:, 400].set(1.0).at[:, 650].set(1.0)  # two maxima in different splits
    tokens, _ = api.greedy_head(hidden, weight, implementation=impl, sizes=SIZES[impl])
    np.testing.assert_array_equal(tokens, 400)


def test_reference_is_the_model_head():
    hidden = jax.random.normal(jax.random.key(0), (2, 4, 32))
    weight = jax.random.normal(jax.random.key(1), (32, 100))
    for got, want in zip(greedy_head_reference(hidden, weight), greedy_head_xla(hidden, weight)):
        np.testing.assert_array_equal(got, want)


def test_merge_skips_empty_splits():
    best = jnp.array([[1.0], [-jnp.inf], [1.0]])
    arg = jnp.array([[7], [0], [9]])
    total = jnp.array([[2.0], [0.0], [2.0]])
    token, prob = merge_head_partials(best, arg, total)
    assert int(token[0]) == 7 and float(prob[0]) == pytest.approx(0.25)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_verify_greedy_matches_decode_acceptance(impl):
    hidden = jax.random.normal(jax.random.key(2), (3, 8, 64))
    weight = jax.random.normal(jax.random.key(3), (64, 256))
    verified, _ = greedy_head_xla(hidden, weight)
    # Drafts agreeing with the verify pass for 0, 3 and all 7 slots.
    draft = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), verified[:, :-1]], axis=1)
    draft = draft.at[0, 1].set(verified[0, 0] + 1).at[1, 4].set(verified[1, 3] + 1)
    tokens, confidence, accepted = api.verify_greedy(hidden, weight, draft, implementation=impl)
    np.testing.assert_array_equal(tokens, verified)
    np.testing.assert_array_equal(accepted, accepted_length(draft, verified))
    np.testing.assert_array_equal(accepted, [1, 4, 8])
    assert confidence.shape == (3, 8)


def test_dispatch():
    if jax.default_backend() == "cpu":
        assert api.resolve_head_implementation("auto", 64) == "xla"
        with pytest.raises(NotImplementedError, match="needs a TPU"):
            api.resolve_head_implementation("pallas_tpu", 64)
        assert api.resolve_head_implementation("pallas_triton", 64, fallback=True) == "xla"
    with pytest.raises(NotImplementedError, match="multiple of 16"):
        api.resolve_head_implementation("pallas_triton_interpret", 40)
