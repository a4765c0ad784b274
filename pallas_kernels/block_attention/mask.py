"""The decode-attention mask as the kernels see it: which cache and block tiles a query tile visits.

A decode block of ``T`` queries attends over the key axis ``[cache (S slots, the first
length[b] valid) | the block's own T keys]`` (NLD_SPEC.md section 4). The cache part is the
same for every query of a row; the block part is the row's :class:`BlockPattern`, handed to
the kernels as data laid out on their ``(t, g)``-ordered query-row axis (``row = t * G + g``):
each query row gets the ``group`` and ``reach`` of its position, each block key its ``group``.
One compiled kernel thus serves causal, bidirectional, mixed and structured batches alike.

Block-sparse metadata, both exact (every skipped tile is fully invisible, every visited one
holds a visible key): cache tiles come from the traced row length, an integer formula the
kernels evaluate in their index maps and loop bounds; block-key tiles come per (row, query tile)
as a :class:`BlockTileList`, computed in jnp from the pattern before the kernel runs: the tiles
holding a key that one of the query tile's rows sees, in ascending order. A causal query tile
lists the tiles up to its last position, a bidirectional one all; a quadratic-spec group lists
the tiles of the seed and drafts it sees and its own, not the fully masked ones between them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, idiv, positions_as_rows, round_up
from pallas_kernels.block_attention.pattern import BlockPattern
from pallas_kernels.block_sparse import visit_lists

__all__ = ["BlockTileList", "CacheBlockMask"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTileList:
    """Per (row, query tile): the block-key tiles to visit. ``index [B, n_q, n_kt]`` lists them in
    ascending order, padded by repeating the last one (a kernel whose index map follows the
    list then re-requests the tile it holds: no DMA); ``count [B, n_q]`` says how many are real
    (>= 1: a query sees its own key)."""

    index: jax.Array  # [B, n_q, n_kt] int32
    count: jax.Array  # [B, n_q] int32

    def visited(self) -> jax.Array:
        """Dense ``[B, n_q, n_kt]`` bool: the tiles a kernel following the list visits."""
        n_kt = self.index.shape[-1]
        real = jnp.arange(n_kt)[None, None, :] < self.count[..., None]
        hit = self.index[..., :, None] == jnp.arange(n_kt)  # [B, n_q, list entry, tile]
        return jnp.any(hit & real[..., None], axis=-2)


@dataclasses.dataclass(frozen=True)
class CacheBlockMask:
    """Visibility on ``[cache | block]`` for a block of ``block_len`` queries.

    Cache slot ``j`` is visible iff ``j < length``. Block key ``u`` is visible to a query of
    group ``row_group`` and reach ``row_reach`` iff ``u < row_reach`` or its own group equals
    ``row_group`` (and ``u < block_len``: keys past the block are tile padding). Every query
    sees at least its own key, so no row is ever fully masked.
    """

    block_len: int

    @staticmethod
    def cache(slot, length):
        return slot < length

    def block(self, u, key_group, row_group, row_reach):
        return ((u < row_reach) | (key_group == row_group)) & (u < self.block_len)

    # The pattern as kernel operands.

    @staticmethod
    def on_rows(pattern: BlockPattern, group: int, rows_padded: int) -> tuple[jax.Array, jax.Array]:
        """``(row_group, row_reach)``, each ``[B, rows_padded]`` int32 on the query-row axis."""
        return tuple(positions_as_rows(x.astype(jnp.int32), group, rows_padded) for x in (pattern.group, pattern.reach))

    def on_keys(self, pattern: BlockPattern, block_kv_new: int) -> jax.Array:
        """``[B, round_up(T, block_kv_new)]``: each block key's group, whole tiles (the padding
        keys are masked by ``u < block_len`` whatever their group)."""
        padded = round_up(self.block_len, block_kv_new)
        return jnp.pad(pattern.group.astype(jnp.int32), ((0, 0), (0, padded - self.block_len)))

    def materialize(self, lengths, pattern: BlockPattern, cache_size: int) -> jax.Array:
        """Dense ``[B, T, S + T]`` boolean mask (one row per block position: the G query heads
        of a position share it), from the predicates the kernels evaluate."""
        lengths = jnp.asarray(lengths)
        B, T = lengths.shape[0], self.block_len
        slot = jnp.arange(cache_size)[None, None, :]
        cache = jnp.broadcast_to(self.cache(slot, lengths[:, None, None]), (B, T, cache_size))
        u = jnp.arange(T)[None, None, :]
        block = self.block(u, pattern.group[:, None, :], pattern.group[:, :, None], pattern.reach[:, :, None])
        return jnp.concatenate([cache, block], axis=-1)

    # Block-sparse metadata.

    @staticmethod
    def cache_tiles(length, block_kv: int):
        """Cache tiles holding at least one valid slot (tiles past them are skipped)."""
        return idiv(length + block_kv - 1, block_kv)

    def block_tile_visible(self, pattern: BlockPattern, group: int, block_q: int, block_kv_new: int) -> jax.Array:
        """``[B, n_q, n_kt]`` bool: whether query tile i (``block_q`` rows of the ``(t, g)`` row
        axis, padding rows repeating the last position) sees any key of block-key tile kt."""
        B, T = pattern.shape
        n_kt = cdiv(T, block_kv_new)
        visible = jnp.pad(pattern.visible(), ((0, 0), (0, 0), (0, n_kt * block_kv_new - T)))
        by_tile = jnp.any(visible.reshape(B, T, n_kt, block_kv_new), axis=-1)  # [B, T, n_kt]
        rows_padded = round_up(T * group, block_q)
        rows = positions_as_rows(by_tile, group, rows_padded)
        return jnp.any(rows.reshape(B, rows_padded // block_q, block_q, n_kt), axis=2)

    def block_tile_list(self, pattern: BlockPattern, group: int, block_q: int, block_kv_new: int) -> BlockTileList:
        """The block-key tiles each query tile visits: those of :meth:`block_tile_visible`."""
        return BlockTileList(*visit_lists(self.block_tile_visible(pattern, group, block_q, block_kv_new)))
