"""Pure-jnp references (the oracles every kernel is tested against): dense masks, one softmax.

Numerics follow ``nld_jax.attention.attention_xla``: scores and softmax in float32, the
probabilities cast to the value dtype for the second matmul, GQA by grouping query heads
(``[B, T, K, G, Dh]``) so K/V are never repeated. The masks come from
:mod:`pallas_kernels.block_attention.masks`, the same objects that drive the kernels' tile skipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.masks import BlockDiffMask, CacheBlockMask

__all__ = ["masked_attention_reference", "block_attention_reference", "block_diff_attention_reference"]


def masked_attention_reference(q, k, v, mask):
    """Softmax attention of ``q [B, Tq, H, Dh]`` over ``k, v [B, Tk, K, Dh]`` under a boolean
    ``mask`` broadcastable to ``[B, Tq, Tk]`` (True = visible); scale ``1/sqrt(Dh)``.

    Values of keys that no query of the row can see are zeroed first, so masked-out garbage
    (stale or even NaN cache slots) cannot leak through ``0 * NaN``. Every query must see at
    least one key (true of every NLD mask).
    """
    B, Tq, H, Dh = q.shape
    Tk, K = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of KV heads {K}")
    G = H // K
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), (B, Tq, Tk))
    f32 = jnp.float32
    qg = q.reshape(B, Tq, K, G, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=f32) * (1.0 / Dh ** 0.5)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    seen = jnp.any(mask, axis=1)[:, :, None, None]  # [B, Tk, 1, 1]
    v = jnp.where(seen, v, jnp.zeros((), v.dtype))
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=f32)
    return out.reshape(B, Tq, H, Dh).astype(q.dtype)


def block_attention_reference(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool):
    """The decode attention of ``nld_jax.attention`` with a dense mask.

    ``q [B, T, H, Dh]`` at positions ``length[b] + arange(T)`` sees cache slots
    ``< cache_lengths[b]`` and the block's keys ``k, v [B, T, K, Dh]`` (``u <= t`` when causal,
    all of them otherwise). Lengths past ``S`` mean "the whole cache".
    """
    S, T = cache_k.shape[1], q.shape[1]
    lengths = jnp.clip(jnp.asarray(cache_lengths, jnp.int32), 0, S)
    keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    mask = CacheBlockMask(causal).materialize(lengths, S, T)
    return masked_attention_reference(q, keys, values, mask)


def block_diff_attention_reference(q, k, v, block_size: int):
    """Training attention over ``[x_t noisy | x_0 clean]`` with the ``block_diff`` mask.

    ``q [B, 2L, H, Dh]``, ``k, v [B, 2L, K, Dh]``; ``block_size`` is the diffusion block ``b``.
    Differentiable (plain jnp), so it is also the gradient oracle of the kernels.
    """
    n = q.shape[1]
    if n % 2 or k.shape[1] != n or v.shape[1] != n:
        raise ValueError(f"block_diff attention needs q, k, v of one even length 2L, got "
                         f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    mask = BlockDiffMask(n // 2, block_size).materialize()
    return masked_attention_reference(q, k, v, mask[None])
