"""What the kernel test suites share: tolerances by dtype, input builders, backend markers.

Every kernel is checked against its jnp reference with the same suite; kernels that the Pallas
interpreter can run are checked on CPU, the compiled ones on their hardware only (skipped
elsewhere, with the reason printed by ``pytest -ra``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

__all__ = ["TOLERANCES", "assert_close", "block_inputs", "on_gpu", "on_tpu", "GPU_ONLY", "TPU_ONLY",
           "INTERPRETED", "COMPILED"]

# Kernel vs reference. bfloat16: the kernels round the (unnormalised) probabilities to bf16
# before the value matmul where the reference rounds normalised ones, and both round the
# output; a few bf16 ulps (2^-8 relative) apart.
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=3e-2, rtol=3e-2),
}


def assert_close(actual, expected, dtype=None, **overrides):
    dtype = jnp.dtype(dtype or expected.dtype)
    tol = {**TOLERANCES[dtype], **overrides}
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.isfinite(actual).all(), "non-finite output: an unwritten (poisoned) tile or a NaN leak"
    np.testing.assert_allclose(actual, expected, **tol)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


GPU_ONLY = [pytest.mark.gpu,
            pytest.mark.skipif(not on_gpu(), reason="compiled GPU kernel: needs a GPU "
                               "(run benchmarks/gpu_device_check.sh on the GPU machine)")]
TPU_ONLY = [pytest.mark.skipif(not on_tpu(), reason="compiled TPU kernel: needs a TPU")]

INTERPRETED = ("pallas_interpret", "pallas_triton_interpret")
COMPILED = (
    pytest.param("pallas_triton", marks=GPU_ONLY),
    pytest.param("pallas_mosaic_gpu", marks=GPU_ONLY),
    pytest.param("pallas_tpu", marks=TPU_ONLY),
)


def block_inputs(seed: int, *, B: int, T: int, H: int, K: int, Dh: int, S: int, lengths, dtype,
                 garbage=jnp.nan):
    """Random decode-attention inputs. Cache slots at or past each row's length hold ``garbage``
    (NaN by default): a kernel that reads them without masking produces NaN."""
    return _block_inputs(jax.random.key(seed), jnp.asarray(lengths, jnp.int32), B=B, T=T, H=H, K=K, Dh=Dh, S=S,
                         dtype=jnp.dtype(dtype), garbage=float(garbage))


# One compiled program per shape (op-by-op dispatch would compile every small op separately).
@functools.partial(jax.jit, static_argnames=("B", "T", "H", "K", "Dh", "S", "dtype", "garbage"))
def _block_inputs(key, lengths, *, B, T, H, K, Dh, S, dtype, garbage):
    keys = jax.random.split(key, 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    q, k, v = normal(keys[0], (B, T, H, Dh)), normal(keys[1], (B, T, K, Dh)), normal(keys[2], (B, T, K, Dh))
    cache_k, cache_v = normal(keys[3], (B, S, K, Dh)), normal(keys[4], (B, S, K, Dh))
    stale = (jnp.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
    cache_k = jnp.where(stale, jnp.asarray(garbage, dtype), cache_k)
    cache_v = jnp.where(stale, jnp.asarray(garbage, dtype), cache_v)
    return q, k, v, cache_k, cache_v, lengths
