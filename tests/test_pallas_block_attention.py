"""Block attention kernels (decode: a query block over the KV cache) against the dense reference.

One suite, run against every implementation: the interpreted TPU and Triton kernels on CPU,
the compiled ones on their hardware (``-m gpu`` on the GPU machine). Cache slots past each
row's length are NaN, outputs start from NaN (``poison=True``), and lengths include 0 and S.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nld_jax.attention import attention_xla
from pallas_kernels.block_attention import api
from pallas_kernels.block_attention.kernel_mgpu import MosaicBlockSizes
from pallas_kernels.block_attention.kernel_tpu import TpuBlockSizes
from pallas_kernels.block_attention.kernel_triton import TritonBlockSizes
from pallas_kernels.block_attention.masks import CacheBlockMask
from pallas_kernels.block_attention.reference import block_attention_reference
from pallas_kernels.testing import COMPILED, INTERPRETED, assert_close, block_inputs

# Small tiles force many tiles, ragged last tiles, several query tiles and several splits.
SMALL_SIZES = {
    "pallas_interpret": TpuBlockSizes(block_q=16, block_kv=16, block_kv_new=8),
    "pallas_tpu": TpuBlockSizes(block_q=128, block_kv=128, block_kv_new=128),
    "pallas_triton_interpret": TritonBlockSizes(block_q=16, block_kv=16, block_kv_new=16, num_splits=3),
    "pallas_triton": TritonBlockSizes(block_q=16, block_kv=16, block_kv_new=16, num_splits=3),
    "pallas_mosaic_gpu": MosaicBlockSizes(block_kv=64, num_splits=3),
}

# (G, C, causal, dtype, S, Dh): every G, every C, both modes, both dtypes, in 4 runs per kernel
# (the slow sweep runs the full product).
CASES = [
    (1, 1, True, jnp.float32, 40, 32),
    (2, 8, False, jnp.bfloat16, 77, 64),
    (4, 16, True, jnp.bfloat16, 50, 32),
    (8, 32, False, jnp.float32, 24, 32),
]


@functools.partial(jax.jit, static_argnames="causal")
def _reference(*args, causal):
    with jax.default_matmul_precision("highest"):
        return block_attention_reference(*args, causal=causal)


def _case_id(case):
    G, C, causal, dtype, S, Dh = case
    return f"G{G}-C{C}-{'causal' if causal else 'bidir'}-{jnp.dtype(dtype).name}-S{S}-Dh{Dh}"


def _run(impl, case, seed, sizes="small"):
    G, C, causal, dtype, S, Dh = case
    if impl == "pallas_tpu" or impl == "pallas_mosaic_gpu":
        Dh = 128  # the compiled kernels' head-size granule
    K = 2 if G < 8 else 1
    if impl not in INTERPRETED:
        reason = api.unsupported_reason(impl, (3, C, K * G, Dh), K, dtype)
        if reason:
            pytest.skip(reason)
    rng = np.random.default_rng(seed)
    lengths = [0, S, int(rng.integers(1, S))]  # empty, full and ragged rows in one batch
    # Stale slots are NaN, except for the Mosaic GPU kernel, whose tensor-core P @ V takes V
    # straight from SMEM: it needs finite stale slots (as KVCache guarantees), so they get
    # large finite values there (wrongly used, they would still show).
    garbage = 1e4 if impl == "pallas_mosaic_gpu" else jnp.nan
    args = block_inputs(seed, B=3, T=C, H=K * G, K=K, Dh=Dh, S=S, lengths=lengths, dtype=dtype, garbage=garbage)
    sizes = SMALL_SIZES[impl] if sizes == "small" else sizes
    out = jax.jit(functools.partial(api.block_attention, causal=causal, implementation=impl, sizes=sizes,
                                    poison=True))(*args)
    ref = _reference(*args, causal=causal)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_kernel_matches_reference(impl, case):
    _run(impl, case, seed=CASES.index(case))


@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_kernel_default_sizes(impl):
    # The production tile sizes (one tile per axis at these shapes) and a prefill-sized block.
    _run(impl, (4, 32, True, jnp.bfloat16, 200, 32), seed=11, sizes=None)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", COMPILED)
def test_compiled_kernel_matches_reference(impl, case):
    _run(impl, case, seed=CASES.index(case))


@pytest.mark.slow
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_kernel_full_sweep(impl):
    """Every GQA ratio x block size, modes and dtypes alternating so that each G and each C
    meets both modes and both dtypes; random cache sizes."""
    rng = np.random.default_rng(0)
    for n, (gi, ci) in enumerate(itertools.product(range(4), range(4))):
        G, C = (1, 2, 4, 8)[gi], (1, 8, 16, 32)[ci]
        causal, dtype = (gi + ci) % 2 == 0, (jnp.float32, jnp.bfloat16)[(gi + ci // 2) % 2]
        _run(impl, (G, C, causal, dtype, int(rng.integers(8, 90)), 32), seed=100 + n)


def test_empty_cache_and_prefill_shapes():
    """S = 0 (a prefill from scratch) and a block longer than the tiles."""
    for impl in INTERPRETED:
        args = block_inputs(5, B=2, T=24, H=4, K=2, Dh=32, S=0, lengths=[0, 0], dtype=jnp.float32)
        out = jax.jit(functools.partial(api.block_attention, causal=True, implementation=impl, poison=True))(*args)
        assert_close(out, _reference(*args, causal=True))


def test_reference_agrees_with_model_attention():
    """The dense-mask oracle is the model's own attention (finite garbage: attention_xla, unlike
    the oracle, lets NaN garbage through 0 * NaN)."""
    for causal in (True, False):
        args = block_inputs(3, B=3, T=8, H=8, K=2, Dh=32, S=20, lengths=[0, 20, 7], dtype=jnp.float32, garbage=9.0)
        np.testing.assert_allclose(_reference(*args, causal=causal),
                                   jax.jit(attention_xla, static_argnames="causal")(*args, causal=causal),
                                   atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_mask_tile_metadata_is_exact(causal):
    """Tiles the kernels skip are fully masked in the dense mask, and the last tile they visit
    is not: skipping is exact, neither unsafe nor wasteful."""
    mask = CacheBlockMask(causal)
    S, T, G = 45, 12, 4
    lengths = jnp.arange(0, S + 1, 3, dtype=jnp.int32)
    dense = np.asarray(mask.materialize(lengths, S, T))  # [B, T, S + T]
    for bk in (8, 16):
        n_cache = np.asarray(mask.cache_tiles(lengths, bk))
        for b, length in enumerate(np.asarray(lengths)):
            visible_cache = dense[b, :, :S].any(axis=0)
            assert not visible_cache[n_cache[b] * bk:].any()
            if length:
                assert visible_cache[(n_cache[b] - 1) * bk:].any()
    for bq, bkn in ((8, 4), (16, 8), (48, 16)):
        for start in range(0, T * G, bq):
            rows_t = np.arange(start, min(start + bq, T * G)) // G
            need = int(mask.block_tiles(start, bq, G, T, bkn))
            visible_block = dense[0][rows_t][:, S:].any(axis=0)
            assert not visible_block[need * bkn:].any()
            assert visible_block[(need - 1) * bkn:].any()


def test_dispatch():
    args = block_inputs(1, B=1, T=4, H=2, K=1, Dh=32, S=8, lengths=[5], dtype=jnp.float32)
    if jax.default_backend() == "cpu":
        assert api.resolve_implementation("auto", (1, 4, 2, 32), 1, jnp.float32) == "xla"
        with pytest.raises(NotImplementedError, match="needs a TPU"):
            api.block_attention(*args, causal=True, implementation="pallas_tpu")
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            api.block_attention(*args, causal=True, implementation="pallas_triton")
        out = jax.jit(functools.partial(api.block_attention, causal=True, implementation="pallas_tpu",
                                        fallback=True))(*args)
        assert_close(out, _reference(*args, causal=True))
    with pytest.raises(NotImplementedError, match="power of two"):
        api.resolve_implementation("pallas_triton_interpret", (1, 4, 2, 48), 1, jnp.float32)
    with pytest.raises(ValueError, match="unknown"):
        api.resolve_implementation("cudnn", (1, 4, 2, 32), 1, jnp.float32)


def test_registered_in_model_registries():
    from nld_jax.ops import ATTENTION, GREEDY_HEAD

    for name in ("pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", "pallas_interpret", "pallas_triton_interpret"):
        assert name in ATTENTION.names() and name in GREEDY_HEAD.names()
