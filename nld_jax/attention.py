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

import jax
import jax.numpy as jnp

from nld_jax.ops import ATTENTION

__all__ = ["attention", "attention_xla"]


def attention_xla(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool):
    """Plain XLA attention; the numerical reference for every kernel.

    Shapes: ``q [B, T, H, Dh]``, ``k, v [B, T, K, Dh]``, ``cache_k, cache_v [B, S, K, Dh]``,
    ``cache_lengths [B]``. GQA is computed by grouping queries (``[B, T, K, G, Dh]``), so K/V are
    never repeated in memory. Scores and softmax are float32 whatever the compute dtype.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    S = cache_k.shape[1]
    G = H // K
    qg = q.reshape(B, T, K, G, Dh)
    scale = 1.0 / (Dh ** 0.5)
    f32 = jnp.float32
    s_cache = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k, preferred_element_type=f32) * scale
    s_block = jnp.einsum("btkgd,bukd->bkgtu", qg, k, preferred_element_type=f32) * scale

    cache_valid = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [B, S]
    s_cache = jnp.where(cache_valid[:, None, None, None, :], s_cache, -jnp.inf)
    if causal:
        tri = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]  # [T(query), T(key)]
        s_block = jnp.where(tri, s_block, -jnp.inf)

    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_block], axis=-1), axis=-1)
    p_cache, p_block = probs[..., :S].astype(v.dtype), probs[..., S:].astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", p_cache, cache_v, preferred_element_type=f32)
    out = out + jnp.einsum("bkgtu,bukd->btkgd", p_block, v, preferred_element_type=f32)
    return out.reshape(B, T, H, Dh).astype(q.dtype)


def attention(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool, implementation: str = "auto"):
    """Dispatch to the selected implementation (see the module docstring for the semantics)."""
    fn = ATTENTION.resolve(implementation)
    return fn(q, k, v, cache_k, cache_v, cache_lengths, causal=causal)
