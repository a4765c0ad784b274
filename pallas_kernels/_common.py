"""Small helpers shared by the kernels: static validation, layouts, split-softmax merging."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["poison_outputs", "cdiv", "round_up", "next_pow2", "idiv", "irem", "check_block_attention_args", "queries_as_rows",
           "rows_as_queries", "positions_as_rows", "merge_partials", "matmul_precision", "NEG_INF"]

NEG_INF = float("-inf")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def idiv(a, b):
    """``a // b`` for non-negative integers, Python or traced. Traced operands use truncating
    ``lax.div``: ``//`` on arrays is floor division, which Mosaic TPU lowers through a sign
    computation that needs the chip's generation, and it costs extra selects everywhere."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def irem(a, b):
    """``a % b`` for non-negative integers, Python or traced (see :func:`idiv`)."""
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return lax.rem(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def matmul_precision(dtype):
    """float32 inputs get exact products (f32 runs are for checking, not speed); 16-bit inputs
    use the native MXU / tensor-core path with float32 accumulation either way."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def check_block_attention_args(q, k, v, cache_k, cache_v, cache_lengths) -> tuple[int, ...]:
    """Static checks of the decode attention signature; returns ``(B, T, H, K, Dh, S)``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or cache_k.ndim != 4 or cache_v.ndim != 4:
        raise ValueError("q, k, v, cache_k, cache_v must be 4-D ([B, T|S, heads, Dh]); got "
                         f"{q.shape}, {k.shape}, {v.shape}, {cache_k.shape}, {cache_v.shape}")
    B, T, H, Dh = q.shape
    K = k.shape[2]
    S = cache_k.shape[1]
    if k.shape != (B, T, K, Dh) or v.shape != k.shape:
        raise ValueError(f"k, v must be [B, T, K, Dh] = {(B, T, K, Dh)}; got {k.shape}, {v.shape}")
    if cache_k.shape != (B, S, K, Dh) or cache_v.shape != cache_k.shape:
        raise ValueError(f"cache_k, cache_v must be [B, S, K, Dh] = {(B, S, K, Dh)}; got "
                         f"{cache_k.shape}, {cache_v.shape}")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of KV heads {K}")
    if jnp.shape(cache_lengths) != (B,):
        raise ValueError(f"cache_lengths must be [B] = [{B}], got {jnp.shape(cache_lengths)}")
    if T < 1:
        raise ValueError("the query block is empty")
    return B, T, H, K, Dh, S


def queries_as_rows(q, num_kv_heads: int, rows_padded: int):
    """``q [B, T, H, Dh]`` -> ``[B, K, rows_padded, Dh]`` with row ``t * G + g`` holding query
    head ``kh * G + g`` at block position ``t``: the G heads that share a KV head become extra
    rows of one matmul, so each K/V tile is read once per KV head (GQA without repeating K/V).
    The (t, g) order keeps a tile of rows on a contiguous range of positions (causal skipping)."""
    B, T, H, Dh = q.shape
    G = H // num_kv_heads
    rows = q.reshape(B, T, num_kv_heads, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, num_kv_heads, T * G, Dh)
    return jnp.pad(rows, ((0, 0), (0, 0), (0, rows_padded - T * G), (0, 0)))


def rows_as_queries(rows, T: int, H: int):
    """Inverse of :func:`queries_as_rows` (padding rows dropped)."""
    B, K, _, Dh = rows.shape
    G = H // K
    return rows[:, :, :T * G].reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


def positions_as_rows(x, group: int, rows_padded: int):
    """A per-position ``x [B, T, ...]`` on the row axis of :func:`queries_as_rows`:
    ``[B, rows_padded, ...]`` with row ``t * group + g`` holding ``x[:, t]``. Padding rows repeat
    the last position: they then see no key it does not, so they neither add a key tile to their
    query tile nor empty a softmax."""
    rows = jnp.repeat(x, group, axis=1)
    pad = ((0, 0), (0, rows_padded - rows.shape[1])) + ((0, 0),) * (x.ndim - 2)
    return jnp.pad(rows, pad, mode="edge")


def merge_partials(acc, m, l, axis: int):
    """Merge split-softmax partials along ``axis``: ``acc`` unnormalised ``sum exp(s - m) v``,
    ``m`` the running max and ``l`` the sum of exponentials (``m, l`` without the Dh axis).

    A split that saw no visible key has ``m = -inf, l = 0, acc = 0`` and gets weight 0 (the
    naive ``exp(-inf - -inf)`` would be NaN)."""
    m_all = jnp.max(m, axis=axis, keepdims=True)
    m_safe = jnp.where(m_all == NEG_INF, 0.0, m_all)
    w = jnp.where(m == NEG_INF, 0.0, jnp.exp(m - m_safe))
    l_all = jnp.sum(w * l, axis=axis)
    acc_all = jnp.sum(w[..., None] * acc, axis=axis)
    return acc_all / jnp.where(l_all == 0, 1.0, l_all)[..., None]


def poison_outputs(out_shapes, in_specs: list, operands: list) -> dict[int, int]:
    """Tests' ``poison=True``: each output starts as NaN (integers as -1) through an aliased extra
    operand, so a tile the kernel forgot to write shows up, on real hardware too. Appends the
    operands and their specs; returns ``input_output_aliases`` (operand indices count the
    scalar-prefetch operands, which ``operands`` already holds)."""
    aliases = {}
    for n, shape in enumerate(out_shapes):
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        fill = jnp.nan if jnp.issubdtype(shape.dtype, jnp.floating) else -1
        operands.append(jnp.full(shape.shape, fill, shape.dtype))
        aliases[len(operands) - 1] = n
    return aliases
