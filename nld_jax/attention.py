"""Attention of a block of queries over (cached prefix ++ the block's own K/V).

One function serves every decode mode (NLD_SPEC.md section 4):

* ``causal=True``: query t of the block (absolute position ``length + t``) sees the whole valid
  cache and the block's keys ``u <= t``. Prefill, AR decode, speculative verify, block commit.
* ``causal=False``: every query sees the whole valid cache and the whole block (bidirectional
  within the block). Diffusion denoising and the speculative draft.

The cache is never written here: the caller writes the block's K/V afterwards (causal calls
only), so the same function handles both modes and the read-only guarantee of diffusion steps
is structural.

Kernels plug in through :data:`nld_jax.ops.ATTENTION` (``ATTENTION.register(name, fn,
auto_for=("gpu",))``); ``implementation="auto"`` picks the kernel registered for the backend
and falls back to the XLA version below, which is also every kernel's numerical reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nld_jax.ops import ATTENTION
from nld_jax.sharding import shard_kernel

__all__ = ["attention", "attention_xla"]


def gqa_rows(x: jax.Array, K: int) -> jax.Array:
    """``[B, T, H, Dh]`` -> ``[B, K, T*G, Dh]``: the G query heads of each KV head and the T
    positions as rows of one matmul per KV head (row ``t*G + g``)."""
    B, T, H, Dh = x.shape
    return x.reshape(B, T, K, H // K, Dh).transpose(0, 2, 1, 3, 4).reshape(B, K, T * (H // K), Dh)


def gqa_unrows(x: jax.Array, T: int, G: int) -> jax.Array:
    """The inverse of :func:`gqa_rows`: ``[B, K, T*G, Dh]`` -> ``[B, T, K*G, Dh]``."""
    B, K, _, Dh = x.shape
    return x.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, Dh)


def attention_xla(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool):
    """Plain XLA attention; the numerical reference for every kernel.

    Shapes: ``q [B, T, H, Dh]``, ``k, v [B, T, K, Dh]``, ``cache_k, cache_v [B, S, K, Dh]``,
    ``cache_lengths [B]``. GQA without repeating K/V: the G query heads of a KV head and the T
    block positions become the T*G rows of one matmul per KV head (``[B, K, T*G, Dh]``), which
    XLA runs far better than a matmul per (head, group). Scores over the cache and over the
    block are computed apart (no copy of the cache to concatenate keys) and share one float32
    softmax.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    S = cache_k.shape[1]
    G = H // K
    f32 = jnp.float32
    scale = 1.0 / (Dh ** 0.5)
    rows = gqa_rows(q, K)  # row r = t*G + g
    s_cache = jnp.einsum("bkrd,bskd->bkrs", rows, cache_k, preferred_element_type=f32) * scale
    s_block = jnp.einsum("bkrd,bukd->bkru", rows, k, preferred_element_type=f32) * scale

    cache_valid = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [B, S]
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache, -jnp.inf)
    if causal:
        row_pos = jnp.arange(T * G) // G  # block position of each row
        s_block = jnp.where(jnp.arange(T)[None, :] <= row_pos[:, None], s_block, -jnp.inf)

    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_block], axis=-1), axis=-1)
    p_cache, p_block = probs[..., :S].astype(v.dtype), probs[..., S:].astype(v.dtype)
    out = jnp.einsum("bkrs,bskd->bkrd", p_cache, cache_v, preferred_element_type=f32)
    out = out + jnp.einsum("bkru,bukd->bkrd", p_block, v, preferred_element_type=f32)
    return gqa_unrows(out, T, G).astype(q.dtype)


def attention(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool, implementation: str = "auto"):
    """Dispatch to the selected implementation (see the module docstring for the semantics)."""
    fn = ATTENTION.resolve(implementation)
    if fn is not ATTENTION.resolve("xla"):
        # Kernels cannot be split by the partitioner: under a mesh they run per (batch, head)
        # shard inside shard_map (a no-op without a mesh). The XLA version is partitioned as is.
        fn = shard_kernel(functools.partial(fn, causal=causal), _KERNEL_IN_AXES, _KERNEL_OUT_AXES,
                          adjust=_whole_groups)
        return fn(q, k, v, cache_k, cache_v, cache_lengths)
    return fn(q, k, v, cache_k, cache_v, cache_lengths, causal=causal)


_Q_AXES = ("batch", "seq", "act_heads", "head_dim")
_KV_AXES = ("batch", "seq", "act_kv_heads", "head_dim")
_CACHE_AXES = ("batch", "cache_seq", "act_kv_heads", "head_dim")
_KERNEL_IN_AXES = (_Q_AXES, _KV_AXES, _KV_AXES, _CACHE_AXES, _CACHE_AXES, ("batch",))
_KERNEL_OUT_AXES = _Q_AXES


def _whole_groups(in_specs, out_spec):
    """A kernel shard must hold whole GQA groups: if the KV heads are replicated (they do not
    divide the tensor axis) the query heads are gathered too, so each shard runs all heads."""

    def heads(spec):
        return spec[2] if len(spec) > 2 else None

    def without_heads(spec):
        return PartitionSpec(*[None if i == 2 else p for i, p in enumerate(spec)])

    if heads(in_specs[1]) is None and heads(in_specs[0]) is not None:
        in_specs[0], out_spec = without_heads(in_specs[0]), without_heads(out_spec)
    return in_specs, out_spec
