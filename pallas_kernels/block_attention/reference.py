"""Block attention in plain XLA: the ``xla`` implementation and every kernel's oracle.

``q [B, T, H, Dh]`` (block position t of row b sits at absolute position ``lengths[b] + t``)
attends to the valid cache prefix ``cache_k/v [B, S, K, Dh]`` (slots ``< lengths[b]``) and to the
block's own keys ``k, v [B, T, K, Dh]`` as :class:`BlockPattern` says. Scale ``1/sqrt(Dh)``,
scores and softmax in float32.

GQA without repeating K/V: the G query heads of a KV head and the T block positions become the
``T*G`` rows of one matmul per KV head (``[B, K, T*G, Dh]``, row ``t*G + g``), which XLA runs far
better than a matmul per (head, group). Scores over the cache and over the block are computed
apart (no copy of the cache to concatenate keys) and share one softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.pattern import BlockPattern

__all__ = ["block_attention_xla", "gqa_rows", "gqa_unrows"]


def gqa_rows(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """``[B, T, H, Dh]`` -> ``[B, K, T*G, Dh]``: row ``t*G + g`` holds query head ``kh*G + g``."""
    B, T, H, Dh = x.shape
    K = num_kv_heads
    return x.reshape(B, T, K, H // K, Dh).transpose(0, 2, 1, 3, 4).reshape(B, K, T * (H // K), Dh)


def gqa_unrows(x: jax.Array, T: int, G: int) -> jax.Array:
    """The inverse of :func:`gqa_rows`: ``[B, K, T*G, Dh]`` -> ``[B, T, K*G, Dh]``."""
    B, K, _, Dh = x.shape
    return x.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, Dh)


def block_attention_xla(q, k, v, cache_k, cache_v, cache_lengths, pattern: BlockPattern):
    B, T, H, Dh = q.shape
    K = k.shape[2]
    S = cache_k.shape[1]
    G = H // K
    f32 = jnp.float32
    scale = 1.0 / (Dh ** 0.5)
    rows = gqa_rows(q, K)
    s_cache = jnp.einsum("bkrd,bskd->bkrs", rows, cache_k.astype(q.dtype), preferred_element_type=f32) * scale
    s_block = jnp.einsum("bkrd,bukd->bkru", rows, k, preferred_element_type=f32) * scale

    cache_valid = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [B, S]
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache, -jnp.inf)
    block_visible = jnp.repeat(pattern.visible(), G, axis=1)  # [B, T*G, T]: row t*G+g is query t
    s_block = jnp.where(block_visible[:, None], s_block, -jnp.inf)

    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_block], axis=-1), axis=-1)
    p_cache, p_block = probs[..., :S].astype(v.dtype), probs[..., S:].astype(v.dtype)
    out = jnp.einsum("bkrs,bskd->bkrd", p_cache, cache_v.astype(v.dtype), preferred_element_type=f32)
    out = out + jnp.einsum("bkru,bukd->bkrd", p_block, v, preferred_element_type=f32)
    return gqa_unrows(out, T, G).astype(q.dtype)
