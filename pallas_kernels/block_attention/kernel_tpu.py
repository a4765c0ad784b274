"""Block attention over the KV cache: the Pallas TPU (Mosaic) kernel.

Grid ``(B, K, query-row tiles, cache tiles + block tiles)``; the last axis walks the key axis
``[cache | block]`` sequentially with an online softmax in float32 scratch (VMEM).

* GQA: the G query heads of a KV head are rows of one matmul (``queries_as_rows``), so every
  K/V tile is fetched once per KV head, never repeated.
* The block's visibility is data (:class:`BlockPattern`, laid out by ``CacheBlockMask``): each
  query row carries its position's group and reach, each block key its group, and a tile's
  mask is one compare of the two. Rows of one batch may have different patterns.
* Ragged lengths and block sparsity: ``cache_lengths`` and, per (row, query tile), the list of
  block-key tiles holding a visible key and its count (``CacheBlockMask.block_tile_list``) are
  scalar-prefetched (SMEM). Cache steps clamp their tile to the row's last valid one; block
  step j fetches tile ``list[j]``, and the list's padding repeats its last tile. Either way the
  pipeline re-requests the tile it already holds and issues no DMA for a skipped step, and
  ``pl.when`` skips its compute. Causal query tiles stop at the block tile of their last
  position; a quadratic-spec group tile visits the drafts' tile and its own, not the fully
  masked tiles between them. The grid keeps one step per block-key tile (it is static); a
  skipped step costs only the pipeline's per-step overhead.
* The cache is read as ``[B, S, K*Dh]`` (a free reshape) so a ``(block_kv, Dh)`` tile of one
  head is a strided DMA with Dh on the lanes; on real TPUs Dh must be a multiple of 128
  (``supported``), which NLD's 128 is. The interpreter has no such constraint.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (NEG_INF, cdiv, check_block_attention_args, matmul_precision, poison_outputs,
                                    queries_as_rows, round_up, rows_as_queries)
from pallas_kernels.block_attention.mask import CacheBlockMask
from pallas_kernels.block_attention.pattern import BlockPattern

__all__ = ["TpuBlockSizes", "block_attention_tpu", "supported_tpu"]

# Mosaic tiles the last two axes of a VMEM block by (8 sublanes, 128 lanes). The pattern
# operands are laid out densely in those tiles, as jax's TPU flash attention lays out segment
# ids: a query row's group / reach repeated over the lanes, a key's group over the sublanes.
_LANES, _SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tile sizes (upper bounds: a tile never exceeds its axis). Multiples of 16 suit bf16."""

    block_q: int = 256  # query rows (block positions x G heads) per tile
    block_kv: int = 512  # cache slots per tile
    block_kv_new: int = 256  # block keys per tile

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_kv_new"):
            if getattr(self, name) < 8 or getattr(self, name) % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {getattr(self, name)}")


def supported_tpu(head_dim: int) -> bool:
    """Shapes the compiled TPU kernel handles (the interpreter handles every shape)."""
    return head_dim % 128 == 0


def _online_softmax_step(q_ref, k_ref, v_ref, visible, key_ok, m_ref, l_ref, acc_ref, scale):
    """Fold one key tile into the running (max, sum, accumulator) of every query row."""
    q, k = q_ref[...], k_ref[...]
    precision = matmul_precision(q.dtype)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    s = jnp.where(visible, s, NEG_INF)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with nothing visible yet keeps m = -inf; shifting by 0 instead keeps exp() NaN-free.
    m_shift = jnp.where(m_new == NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_shift)
    p = jnp.exp(s - m_shift)
    # Slots past a row's length may hold anything (stale entries, padding): zero them so that
    # p = 0 never meets a NaN.
    v = jnp.where(key_ok, v_ref[...], jnp.zeros((), v_ref.dtype))
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new


def _kernel(lengths_ref, count_ref, index_ref, q_ref, ck_ref, cv_ref, kn_ref, vn_ref, rg_ref, rr_ref, kg_ref, *refs,
            mask: CacheBlockMask, bk: int, bkn: int, n_q: int, n_cache: int, n_block: int, scale: float):
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]  # an aliased poison input may precede them
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = lengths_ref[b]
    step = functools.partial(_online_softmax_step, q_ref, m_ref=m_ref, l_ref=l_ref, acc_ref=acc_ref,
                             scale=scale)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j < n_cache) & (j < mask.cache_tiles(length, bk)))
    def _cache_tile():
        slot = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        slot_col = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)  # the same slots, as rows of V
        # Slots of a ragged last tile past S are padding: length <= S hides them too.
        step(ck_ref, cv_ref, mask.cache(slot, length), mask.cache(slot_col, length))

    jb = j - n_cache

    @pl.when((j >= n_cache) & (jb < count_ref[b * n_q + i]))
    def _block_tile():
        start = index_ref[(b * n_q + i) * n_block + jb] * bkn  # the tile block_map fetched
        u = start + lax.broadcasted_iota(jnp.int32, (1, bkn), 1)
        u_col = start + lax.broadcasted_iota(jnp.int32, (bkn, 1), 0)
        # [bq, 1] per query row against [1, bkn] per key: the tile's mask by broadcasting.
        row_group, row_reach = rg_ref[...][:, :1], rr_ref[...][:, :1]
        visible = mask.block(u, kg_ref[...][:1, :], row_group, row_reach)
        # The last tile may run past T: those columns are padding, masked and zeroed.
        step(kn_ref, vn_ref, visible, u_col < mask.block_len)

    @pl.when(j == n_cache + n_block - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


def block_attention_tpu(q, k, v, cache_k, cache_v, cache_lengths, pattern: BlockPattern, *,
                        sizes: TpuBlockSizes | None = None, interpret=False, poison: bool = False):
    """``block_attention_xla`` semantics: any :class:`BlockPattern`, per row.

    ``interpret``: False (compile for TPU), True (the Pallas HLO interpreter, any backend) or a
    ``pltpu.InterpretParams``. ``poison``: start the output from NaN (aliased), so a tile the
    kernel forgot to write shows up in tests on real hardware too.
    """
    B, T, H, K, Dh, S = check_block_attention_args(q, k, v, cache_k, cache_v, cache_lengths)
    if pattern.shape != (B, T):
        raise ValueError(f"pattern must be [B, T] = {(B, T)}, got {pattern.shape}")
    sizes = sizes or TpuBlockSizes()
    G = H // K
    lengths = jnp.clip(jnp.asarray(cache_lengths, jnp.int32), 0, S)
    if S == 0:  # no cache at all (a prefill from scratch): one empty tile keeps shapes legal
        S = 8
        cache_k = jnp.zeros((B, S, K, Dh), k.dtype)
        cache_v = jnp.zeros((B, S, K, Dh), v.dtype)
    rows = T * G
    # A tile either spans its whole axis or is a multiple of 8 (of 16 for packed bf16 rows): the
    # block shapes Mosaic accepts. Query rows are padded here, so they can always be whole tiles.
    bq = min(sizes.block_q, round_up(rows, 16))
    bk = S if S <= sizes.block_kv else sizes.block_kv
    # The block's own keys: short blocks are zero-padded to one 16-row tile (a 1-key matmul, the
    # AR step, does not lower for bf16; padded keys are masked like a ragged tile's).
    bkn = round_up(T, 16) if T <= sizes.block_kv_new else sizes.block_kv_new
    rows_padded = round_up(rows, bq)
    n_q, n_cache, n_block = rows_padded // bq, cdiv(S, bk), cdiv(T, bkn)
    mask = CacheBlockMask(T)
    # SMEM holds 1-D arrays best: the [B, n_q] counts and [B, n_q, n_block] lists, flattened.
    tiles = mask.block_tile_list(pattern, G, bq, bkn)
    block_count, block_index = tiles.count.reshape(B * n_q), tiles.index.reshape(B * n_q * n_block)

    q_rows = queries_as_rows(q, K, rows_padded)  # [B, K, Rp, Dh]
    # Free reshapes: one head's (tile, Dh) block is then a 2-D strided window.
    ck, cv = cache_k.astype(k.dtype).reshape(B, S, K * Dh), cache_v.astype(v.dtype).reshape(B, S, K * Dh)
    pad_keys = ((0, 0), (0, max(bkn - T, 0)), (0, 0), (0, 0))
    kn, vn = (jnp.pad(x, pad_keys).reshape(B, -1, K * Dh) for x in (k, v))
    row_group, row_reach = (jnp.broadcast_to(x[..., None], (B, rows_padded, _LANES))
                            for x in mask.on_rows(pattern, G, rows_padded))
    # [B, n_block, 8, bkn]: a key tile is then a whole (8, bkn) block for any bkn.
    key_group = jnp.broadcast_to(mask.on_keys(pattern, bkn).reshape(B, n_block, 1, bkn),
                                 (B, n_block, _SUBLANES, bkn))

    def q_map(b, h, i, j, *prefetch):
        return b, h, i, 0

    def rows_map(b, h, i, j, *prefetch):
        return b, i, 0

    def cache_map(b, h, i, j, lengths_ref, count_ref, index_ref):
        last = jnp.maximum(mask.cache_tiles(lengths_ref[b], bk) - 1, 0)
        return b, jnp.minimum(j, last), h

    def block_tile(b, i, j, index_ref):
        # Cache steps prefetch the first listed tile; steps past the count re-request the last.
        return index_ref[(b * n_q + i) * n_block + jnp.clip(j - n_cache, 0, n_block - 1)]

    def block_map(b, h, i, j, lengths_ref, count_ref, index_ref):
        return b, block_tile(b, i, j, index_ref), h

    def key_group_map(b, h, i, j, lengths_ref, count_ref, index_ref):
        return b, block_tile(b, i, j, index_ref), 0, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, Dh), q_map),
        pl.BlockSpec((None, bk, Dh), cache_map),
        pl.BlockSpec((None, bk, Dh), cache_map),
        pl.BlockSpec((None, bkn, Dh), block_map),
        pl.BlockSpec((None, bkn, Dh), block_map),
        pl.BlockSpec((None, bq, _LANES), rows_map),
        pl.BlockSpec((None, bq, _LANES), rows_map),
        pl.BlockSpec((None, None, _SUBLANES, bkn), key_group_map),
    ]
    operands = [lengths, block_count, block_index, q_rows, ck, cv, kn, vn, row_group, row_reach, key_group]
    out_shape = jax.ShapeDtypeStruct((B, K, rows_padded, Dh), q.dtype)
    aliases = poison_outputs([out_shape], in_specs, operands) if poison else {}

    kernel = functools.partial(_kernel, mask=mask, bk=bk, bkn=bkn, n_q=n_q, n_cache=n_cache,
                               n_block=n_block, scale=1.0 / Dh ** 0.5)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, K, n_q, n_cache + n_block),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, Dh), q_map),
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, Dh), jnp.float32)],
        ),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="nld_block_attention",
    )(*operands)
    return rows_as_queries(out, T, H)
