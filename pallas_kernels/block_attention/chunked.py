"""Block attention in XLA over only the cache chunks that hold valid entries.

:func:`~pallas_kernels.block_attention.reference.block_attention_xla` scores every slot of the
cache buffer and masks the invalid ones, so a forward costs the buffer's size, not the valid
prefix's: with a serving slot's ``max_len`` buffer (or generate's buffer sized for a long budget)
holding a short prompt, most of the attention's reads and FLOPs go to masked slots
(``benchmarks/forward_profile.py``: a 4096-slot buffer made the C=8 forward 2-3x slower than a
buffer of the valid length, same 96 valid entries).

This version runs a ``while_loop`` over ``chunk``-slot windows of the buffer, only up to the
longest valid prefix in the batch, with an online softmax (flash attention's running max and sum),
so the cost follows ``max(cache_lengths)``. What it should do on each backend: on GPU and TPU the
same (a decode forward at a short context reads a fraction of the cache buffer; the Pallas kernels
already skip invalid tiles, this is the XLA path doing the same); on CPU likewise. The block's own
keys are folded in first: every query sees at least its own key (:class:`BlockPattern`), so the
running max is finite from the start and no row is ever empty.

It is not differentiable in reverse mode (``while_loop``); training attends without a cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.pattern import BlockPattern
from pallas_kernels.block_attention.reference import gqa_rows, gqa_unrows

__all__ = ["CHUNK", "MIN_SLOTS", "block_attention_xla_chunked", "use_chunked"]

CHUNK = 256  # slots per window: big enough for the matmuls to run well, small enough to skip most of a long buffer
MIN_SLOTS = 1024  # shorter buffers are scored whole: one window loop would not pay for itself


def use_chunked(cache_slots: int) -> bool:
    """Whether the ``xla`` implementation runs chunked for a cache buffer of ``cache_slots`` slots."""
    return cache_slots >= MIN_SLOTS


def block_attention_xla_chunked(q, k, v, cache_k, cache_v, cache_lengths, pattern: BlockPattern, *,
                                chunk: int = CHUNK):
    """Same arguments and result as ``block_attention_xla`` (float32 scores and softmax)."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    S = cache_k.shape[1]
    G = H // K
    chunk = min(chunk, S)
    f32 = jnp.float32
    scale = 1.0 / (Dh ** 0.5)
    rows = gqa_rows(q, K)  # [B, K, R, Dh], R = T*G
    lengths = jnp.minimum(cache_lengths.astype(jnp.int32), S)

    # the block's own keys first: every query sees itself, so the running max starts finite
    s_block = jnp.einsum("bkrd,bukd->bkru", rows, k, preferred_element_type=f32) * scale
    block_visible = jnp.repeat(pattern.visible(), G, axis=1)  # [B, T*G, T]
    s_block = jnp.where(block_visible[:, None], s_block, -jnp.inf)
    m = s_block.max(-1)  # [B, K, R]
    p = jnp.exp(s_block - m[..., None])
    total = p.sum(-1)
    acc = jnp.einsum("bkru,bukd->bkrd", p.astype(v.dtype), v, preferred_element_type=f32)

    n_chunks = (jnp.max(lengths) + chunk - 1) // chunk

    def body(i, carry):
        m, total, acc = carry
        # the last window is moved back to end at S; slots before i*chunk were counted already
        start = jnp.minimum(i * chunk, S - chunk)
        kc = jax.lax.dynamic_slice_in_dim(cache_k, start, chunk, axis=1).astype(q.dtype)
        vc = jax.lax.dynamic_slice_in_dim(cache_v, start, chunk, axis=1).astype(v.dtype)
        slot = start + jnp.arange(chunk)
        valid = (slot[None, :] >= i * chunk) & (slot[None, :] < lengths[:, None])  # [B, chunk]
        s = jnp.einsum("bkrd,bskd->bkrs", rows, kc, preferred_element_type=f32) * scale
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        total = total * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bkrs,bskd->bkrd", p.astype(v.dtype), vc,
                                                       preferred_element_type=f32)
        return m_new, total, acc

    m, total, acc = jax.lax.fori_loop(0, n_chunks, body, (m, total, acc))
    return gqa_unrows(acc / total[..., None], T, G).astype(q.dtype)
