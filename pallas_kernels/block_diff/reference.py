"""``block_diff`` training attention in plain XLA: the ``xla`` implementation and the kernels' oracle.

The layout is ``[noisy (L) | clean (L)]`` with the mask of :mod:`.mask`. Two forms, one result:

* :func:`dense_block_diff_attention` materialises the ``[2L, 2L]`` mask; the block length may be
  traced (one compiled train step for every block length), and a last partial block is fine.
* :func:`structured_block_diff_attention` computes only the three visible parts, about half of
  the dense scores: clean -> clean (causal, ``L x L``), noisy -> clean (earlier blocks, ``L x L``)
  and noisy -> noisy (each block with itself, ``L x b``). It needs a static block length dividing
  L; on CPU a training step runs ~1.5x faster, mostly in the backward pass, whose saved
  probabilities shrink by the same factor.

GQA groups queries (:func:`pallas_kernels.block_attention.gqa_rows`); softmax in float32.
Differentiable (plain jnp), so it is also the kernels' gradient oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.reference import gqa_rows, gqa_unrows
from pallas_kernels.block_diff.mask import block_diff_mask

__all__ = ["block_diff_attention_xla", "dense_block_diff_attention", "structured_block_diff_attention"]

_F32 = jnp.float32


def _masked_attention(q, k, v, mask):
    """``q [B, Tq, H, Dh]`` over ``k, v [B, Tk, K, Dh]`` under ``mask [Tq, Tk]`` (True = visible)."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    s = jnp.einsum("btkgd,bukd->bkgtu", qg, k, preferred_element_type=_F32) / (Dh ** 0.5)
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgtu,bukd->btkgd", p, v, preferred_element_type=_F32)
    return out.reshape(B, T, H, Dh).astype(q.dtype)


def dense_block_diff_attention(q, k, v, block_length):
    return _masked_attention(q, k, v, block_diff_mask(q.shape[1] // 2, block_length))


def structured_block_diff_attention(q, k, v, block_length: int):
    B, T2, H, Dh = q.shape
    K = k.shape[2]
    G, L, b = H // K, T2 // 2, int(block_length)
    nb = L // b
    scale = 1.0 / (Dh ** 0.5)
    kn, kc, vn, vc = k[:, :L], k[:, L:], v[:, :L], v[:, L:]
    pos = jnp.arange(L)

    # clean -> clean: causal.
    qc = gqa_rows(q[:, L:], K)  # [B, K, L*G, Dh]
    s = jnp.einsum("bkrd,bskd->bkrs", qc, kc, preferred_element_type=_F32) * scale
    s = jnp.where(pos[None, :] <= (jnp.arange(L * G) // G)[:, None], s, -jnp.inf)
    out_c = jnp.einsum("bkrs,bskd->bkrd", jax.nn.softmax(s, axis=-1).astype(v.dtype), vc,
                       preferred_element_type=_F32)

    # noisy -> (clean of strictly earlier blocks | own noisy block), one softmax over both.
    qn = q[:, :L].reshape(B, nb, b, K, G, Dh).transpose(0, 3, 1, 2, 4, 5).reshape(B, K, nb, b * G, Dh)
    s_clean = jnp.einsum("bknrd,bskd->bknrs", qn, kc, preferred_element_type=_F32) * scale
    earlier = pos[None, :] < (jnp.arange(nb) * b)[:, None]  # [nb, L]
    s_clean = jnp.where(earlier[:, None, :], s_clean, -jnp.inf)
    kb = kn.reshape(B, nb, b, K, Dh)
    s_own = jnp.einsum("bknrd,bnukd->bknru", qn, kb, preferred_element_type=_F32) * scale
    p = jax.nn.softmax(jnp.concatenate([s_clean, s_own], axis=-1), axis=-1).astype(v.dtype)
    out_n = jnp.einsum("bknrs,bskd->bknrd", p[..., :L], vc, preferred_element_type=_F32)
    out_n = out_n + jnp.einsum("bknru,bnukd->bknrd", p[..., L:], vn.reshape(B, nb, b, K, Dh),
                               preferred_element_type=_F32)
    out_n = out_n.reshape(B, K, nb, b, G, Dh).transpose(0, 2, 3, 1, 4, 5).reshape(B, L, H, Dh)
    out = jnp.concatenate([out_n, gqa_unrows(out_c, L, G)], axis=1)
    return out.astype(q.dtype)


def block_diff_attention_xla(q, k, v, block_length):
    """The structured form when the block length is a static int dividing L, else the dense one."""
    L = q.shape[1] // 2
    if isinstance(block_length, int) and L % block_length == 0:
        return structured_block_diff_attention(q, k, v, block_length)
    return dense_block_diff_attention(q, k, v, block_length)
