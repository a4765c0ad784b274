"""The fused greedy LM head (argmax + its probability, no ``[..., V]`` logits in memory): one suite
run against every implementation, the XLA one included, and a float64 numpy oracle."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.greedy_head import api
from pallas_kernels.greedy_head.kernel_tpu import TpuHeadSizes, merge_head_partials
from pallas_kernels.greedy_head.kernel_triton import TritonHeadSizes
from pallas_kernels.testing import COMPILED, INTERPRETED

import _oracles

IMPLEMENTATIONS = ["xla", *INTERPRETED, *COMPILED]

# Small tiles: several vocabulary tiles per split, uneven splits, a ragged last tile.
SIZES = {
    "xla": None,
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


def _oracle(hidden, weight):
    logits = _oracles.as64(hidden) @ _oracles.as64(weight)
    top = logits.max(axis=-1, keepdims=True)
    return logits, np.argmax(logits, axis=-1), 1.0 / np.exp(logits - top).sum(axis=-1)


def _check(impl, case, seed):
    lead, D, V, dtype = case
    hidden, weight = _head_inputs(jax.random.key(seed), lead, D, V, jnp.dtype(dtype))
    if impl not in INTERPRETED and impl != "xla":
        reason = api.unsupported_reason(impl, D)
        if reason:
            pytest.skip(reason)
    head = functools.partial(api.greedy_head, implementation=impl, sizes=SIZES[impl], poison=impl != "xla")
    tokens, prob = jax.jit(head)(hidden, weight)
    logits, ref_tokens, ref_prob = _oracle(hidden, weight)
    assert tokens.shape == lead and tokens.dtype == jnp.int32 and prob.dtype == jnp.float32
    # float32 accumulation may flip a near-tie: a token is right if its logit is within
    # accumulation error of the maximum (|logit| <~ 20 here, f32 sums over D <= 128 terms).
    chosen = np.take_along_axis(logits, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_array_less(logits.max(-1) - chosen, 1e-4)
    assert np.mean(np.asarray(tokens) == ref_tokens) > 0.9
    np.testing.assert_allclose(np.asarray(prob, np.float64), ref_prob, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
@pytest.mark.parametrize("impl", ["xla", *INTERPRETED])
def test_head_matches_oracle(impl, case):
    _check(impl, case, CASES.index(case))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", *INTERPRETED])
def test_head_more_shapes(impl):
    for case in CASES[3:]:
        _check(impl, case, CASES.index(case))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", COMPILED)
def test_compiled_head_matches_oracle(impl, case):
    _check(impl, case, CASES.index(case))


@pytest.mark.parametrize("impl", ["xla", *INTERPRETED])
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


def test_without_confidence_the_normaliser_is_skipped():
    hidden, weight = _head_inputs(jax.random.key(0), (2, 4), 32, 100, jnp.float32)
    tokens, prob = api.greedy_head(hidden, weight, with_confidence=False, implementation="xla")
    assert prob is None
    np.testing.assert_array_equal(tokens, _oracle(hidden, weight)[1])


def test_merge_skips_empty_splits():
    best = jnp.array([[1.0], [-jnp.inf], [1.0]])
    arg = jnp.array([[7], [0], [9]])
    total = jnp.array([[2.0], [0.0], [2.0]])
    token, prob = merge_head_partials(best, arg, total)
    assert int(token[0]) == 7 and float(prob[0]) == pytest.approx(0.25)


def test_dispatch():
    if jax.default_backend() == "cpu":
        assert api.resolve_implementation("auto", 64) == "xla"
        with pytest.raises(NotImplementedError, match="needs a TPU"):
            api.resolve_implementation("pallas_tpu", 64)
        assert api.resolve_implementation("pallas_triton", 64, fallback=True) == "xla"
    with pytest.raises(NotImplementedError, match="multiple of 16"):
        api.resolve_implementation("pallas_triton_interpret", 40)
    with pytest.raises(ValueError, match="unknown"):
        api.resolve_implementation("cudnn", 64)
