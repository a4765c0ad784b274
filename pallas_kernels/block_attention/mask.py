"""The decode-attention mask as the kernels see it: which cache and block tiles a query tile visits.

A decode block of ``T`` queries attends over the key axis ``[cache (S slots, the first
length[b] valid) | the block's own T keys]`` (NLD_SPEC.md section 4). The cache part is the
same for every query of a row; the block part is the row's :class:`BlockPattern`, handed to
the kernels as data laid out on their ``(t, g)``-ordered query-row axis (``row = t * G + g``):
each query row gets the ``group`` and ``reach`` of its position, each block key its ``group``.
One compiled kernel thus serves causal, bidirectional, mixed and structured batches alike.

Block-sparse metadata, both exact (a skipped tile is fully invisible, the last visited one is
not): cache tiles come from the traced row length, an integer formula the kernels evaluate in
their index maps and loop bounds; block-key tiles per (row, query tile) come from
:meth:`BlockPattern.key_extent`, an int32 array computed in jnp before the kernel runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, idiv, positions_as_rows, round_up
from pallas_kernels.block_attention.pattern import BlockPattern

__all__ = ["CacheBlockMask"]


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

    def block_tiles(self, pattern: BlockPattern, group: int, block_q: int, block_kv_new: int) -> jax.Array:
        """``[B, n_q]`` int32: block-key tiles each query tile visits, those up to the largest
        key any of its rows sees. Causal rows stop at the tile of their last position,
        bidirectional ones visit all; every count is >= 1 (a query sees its own key)."""
        rows_padded = round_up(self.block_len * group, block_q)
        extent = positions_as_rows(pattern.key_extent(), group, rows_padded)
        per_tile = jnp.max(extent.reshape(extent.shape[0], rows_padded // block_q, block_q), axis=-1)
        return cdiv(per_tile, block_kv_new).astype(jnp.int32)
