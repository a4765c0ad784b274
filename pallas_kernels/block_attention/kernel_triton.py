"""Block attention over the KV cache: the Pallas Triton (GPU) kernel, split over the key axis.

A decode step has few programs' worth of queries (``B * K`` row tiles), far fewer than an
H100's 132 SMs, so the key axis ``[cache | block]`` of every row is also cut into
``num_splits`` ranges (flash-decoding). Each program runs an online softmax over its range and
writes an unnormalised ``(acc, max, sum)`` partial; :func:`merge_partials` folds them.

* The block's visibility is data (:class:`BlockPattern`, laid out by ``CacheBlockMask``): each
  query row carries its position's group and reach, each block key its group, and a tile's
  mask is one compare of the two. Rows of one batch may have different patterns.
* Block sparsity: a program visits its row's ``cdiv(length, block_kv)`` cache tiles, then the
  block-key tiles its query tile lists (``CacheBlockMask.block_tile_list``, int32 operands:
  the tiles holding a key one of its rows sees, and their count); step j of the block loop
  loads tile ``list[j]``. The ranges are cut from that visit list (cache tiles first), so the
  splits share the visited tiles only, and tiles past the length or off the list are never
  loaded: short rows and causal query tiles finish early, and a quadratic-spec group tile
  skips the fully masked tiles between the drafts and its own.
* GQA: the G query heads of a KV head are rows of one ``tl.dot`` (``queries_as_rows``).
* Loads past the valid range are masked (``other=0``), which also keeps padded garbage out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG_INF, cdiv, check_block_attention_args, idiv, matmul_precision, merge_partials,
                                    next_pow2, poison_outputs, queries_as_rows, round_up, rows_as_queries)
from pallas_kernels.block_attention.mask import CacheBlockMask
from pallas_kernels.block_attention.pattern import BlockPattern

__all__ = ["TritonBlockSizes", "block_attention_triton", "supported_triton"]


@dataclasses.dataclass(frozen=True)
class TritonBlockSizes:
    """Tile sizes (powers of two, >= 16 for ``tl.dot``) and launch settings."""

    # Query rows per program (cut to the problem). 128 holds a whole C=32 block of 4 heads, so
    # each K/V tile is read once per KV head rather than once per row tile.
    block_q: int = 128
    block_kv: int = 64  # cache slots per loop step
    block_kv_new: int = 32  # block keys per loop step
    num_splits: int | None = None  # key-axis ranges per row tile; None: fill ~2 waves of SMs
    num_warps: int | None = None  # None: 4, or 8 when a program holds more than 64 query rows
    num_stages: int = 2
    target_programs: int = 264  # 2 x the 132 SMs of an H100

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_kv_new"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def supported_triton(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _kernel(len_ref, count_ref, index_ref, q_ref, ck_ref, cv_ref, kn_ref, vn_ref, rg_ref, rr_ref, kg_ref, *refs,
            mask: CacheBlockMask, bk: int, bkn: int, n_splits: int, scale: float):
    from jax.experimental.pallas import triton as pl_triton

    acc_ref, m_ref, l_ref = refs[-3:]  # aliased poison inputs may precede them
    split = pl.program_id(3)
    length = len_ref[...]
    q = q_ref[...]
    precision = matmul_precision(q.dtype)
    row_group, row_reach = rg_ref[...][:, None], rr_ref[...][:, None]

    n_cache = mask.cache_tiles(length, bk)
    total = n_cache + count_ref[...]
    per_split = idiv(total + n_splits - 1, n_splits)
    lo = jnp.minimum(split * per_split, total)
    hi = jnp.minimum(lo + per_split, total)

    def fold(carry, k_ref, v_ref, start, size, key_ok, visible):
        acc, m, l = carry
        k = pl_triton.load(k_ref.at[pl.ds(start, size), :], mask=key_ok[:, None], other=0.0)
        v = pl_triton.load(v_ref.at[pl.ds(start, size), :], mask=key_ok[:, None], other=0.0)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
        s = jnp.where(visible, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_shift = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
        alpha = jnp.exp(m - m_shift)
        p = jnp.exp(s - m_shift[:, None])
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=1)

    def cache_step(t, carry):
        slots = t * bk + jnp.arange(bk, dtype=jnp.int32)
        key_ok = mask.cache(slots, length)
        return fold(carry, ck_ref, cv_ref, t * bk, bk, key_ok, key_ok[None, :])

    def block_step(j, carry):
        start = index_ref[j] * bkn
        u = start + jnp.arange(bkn, dtype=jnp.int32)
        key_group = kg_ref[pl.ds(start, bkn)]  # padded to whole tiles: an unmasked load
        visible = mask.block(u[None, :], key_group[None, :], row_group, row_reach)
        return fold(carry, kn_ref, vn_ref, start, bkn, u < mask.block_len, visible)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full(row_group.shape[:1], NEG_INF, jnp.float32),
             jnp.zeros(row_group.shape[:1], jnp.float32))
    carry = lax.fori_loop(lo, jnp.minimum(hi, n_cache), cache_step, carry)
    carry = lax.fori_loop(jnp.maximum(lo, n_cache) - n_cache, hi - n_cache, block_step, carry)
    acc, m, l = carry
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _num_splits(sizes: TritonBlockSizes, programs: int, max_tiles: int) -> int:
    if sizes.num_splits is not None:
        return max(1, min(sizes.num_splits, max_tiles))
    # Enough ranges to fill the GPU, but at least two tiles per range: partials cost HBM traffic.
    return max(1, min(cdiv(sizes.target_programs, programs), max_tiles // 2))


def block_attention_triton(q, k, v, cache_k, cache_v, cache_lengths, pattern: BlockPattern, *,
                           sizes: TritonBlockSizes | None = None, interpret=False, poison: bool = False):
    """``block_attention_xla`` semantics: any :class:`BlockPattern`, per row."""
    from jax.experimental.pallas import triton as pl_triton  # deprecated backend: import on use

    B, T, H, K, Dh, S = check_block_attention_args(q, k, v, cache_k, cache_v, cache_lengths)
    if pattern.shape != (B, T):
        raise ValueError(f"pattern must be [B, T] = {(B, T)}, got {pattern.shape}")
    if not supported_triton(Dh):
        raise NotImplementedError(f"the Triton kernel needs a power-of-two head_dim >= 16, got {Dh}")
    sizes = sizes or TritonBlockSizes()
    G = H // K
    lengths = jnp.clip(jnp.asarray(cache_lengths, jnp.int32), 0, S)
    if S == 0:  # no cache at all: a dummy slot keeps the operand shapes legal; length 0 hides it
        S = 1
        cache_k = jnp.zeros((B, S, K, Dh), k.dtype)
        cache_v = jnp.zeros((B, S, K, Dh), v.dtype)
    rows = T * G
    bq = min(sizes.block_q, max(16, next_pow2(rows)))
    bk = min(sizes.block_kv, max(16, next_pow2(S)))
    bkn = min(sizes.block_kv_new, max(16, next_pow2(T)))
    rows_padded = round_up(rows, bq)
    n_q = rows_padded // bq
    n_splits = _num_splits(sizes, B * K * n_q, cdiv(S, bk) + cdiv(T, bkn))
    q_rows = queries_as_rows(q, K, rows_padded)
    mask = CacheBlockMask(T)
    row_group, row_reach = mask.on_rows(pattern, G, rows_padded)
    key_group = mask.on_keys(pattern, bkn)
    tiles = mask.block_tile_list(pattern, G, bq, bkn)

    full = lambda length: pl.BlockSpec((None, length, None, Dh), lambda b, h, i, s: (b, 0, h, 0))
    per_row_tile = lambda shape: pl.BlockSpec(shape, lambda b, h, i, s: (b, i))
    in_specs = [
        pl.BlockSpec((None,), lambda b, h, i, s: (b,)),
        per_row_tile((None, None)),
        pl.BlockSpec((None, None, tiles.index.shape[-1]), lambda b, h, i, s: (b, i, 0)),
        pl.BlockSpec((None, None, bq, Dh), lambda b, h, i, s: (b, h, i, 0)),
        full(S), full(S), full(T), full(T),
        per_row_tile((None, bq)), per_row_tile((None, bq)),
        pl.BlockSpec((None, key_group.shape[1]), lambda b, h, i, s: (b, 0)),
    ]
    operands = [lengths, tiles.count, tiles.index, q_rows, cache_k.astype(k.dtype),
                cache_v.astype(v.dtype), k, v, row_group, row_reach, key_group]
    part_shapes = [jax.ShapeDtypeStruct((B, K, n_splits, rows_padded, Dh), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, n_splits, rows_padded), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, n_splits, rows_padded), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, bq, Dh), lambda b, h, i, s: (b, h, s, i, 0)),
                 pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (b, h, s, i)),
                 pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (b, h, s, i))]
    aliases = poison_outputs(part_shapes, in_specs, operands) if poison else {}

    kernel = functools.partial(_kernel, mask=mask, bk=bk, bkn=bkn, n_splits=n_splits, scale=1.0 / Dh ** 0.5)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, n_q, n_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=part_shapes,
        input_output_aliases=aliases,
        compiler_params=pl_triton.CompilerParams(num_warps=sizes.num_warps or (8 if bq > 64 else 4),
                                                 num_stages=sizes.num_stages),
        interpret=interpret,
        name="nld_block_attention_triton",
    )(*operands)
    out = merge_partials(acc, m, l, axis=2).astype(q.dtype)
    return rows_as_queries(out, T, H)
