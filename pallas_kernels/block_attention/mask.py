"""The decode-attention mask as the kernels see it: which cache and block tiles a query tile visits.

:class:`CacheBlockMask`: a decode block of ``T`` queries over the key axis
``[cache (S slots, the first length[b] valid) | the block's own T keys]``, causal or
bidirectional within the block (NLD_SPEC.md section 4). Lengths are traced values, so its
metadata is a pair of cheap integer formulas that the kernels evaluate in their index maps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels._common import cdiv, idiv

__all__ = ["CacheBlockMask"]


@dataclasses.dataclass(frozen=True)
class CacheBlockMask:
    """Visibility of key ``j`` on the axis ``[cache | block]`` for block query ``t``.

    ``j < S``: a cache slot, visible iff ``j < length``. ``j >= S``: block key ``u = j - S``,
    visible iff bidirectional or ``u <= t``. Every query sees at least its own key, so no row
    is ever fully masked.
    """

    causal: bool

    def __call__(self, t, j, length, cache_size: int):
        t, j, length = jnp.asarray(t), jnp.asarray(j), jnp.asarray(length)
        in_cache = j < cache_size
        cache_ok = in_cache & (j < length)
        block_ok = ~in_cache
        if self.causal:
            block_ok = block_ok & (j - cache_size <= t)
        return cache_ok | block_ok

    def materialize(self, lengths, cache_size: int, block_len: int):
        """Dense ``[B, T, S + T]`` boolean mask for per-row ``lengths [B]``."""
        t = jnp.arange(block_len)[None, :, None]
        j = jnp.arange(cache_size + block_len)[None, None, :]
        lengths = jnp.asarray(lengths)
        dense = self(t, j, lengths[:, None, None], cache_size)
        return jnp.broadcast_to(dense, (lengths.shape[0], block_len, cache_size + block_len))

    # Block-sparse metadata. These are integer formulas on traced scalars: the kernels call
    # them inside index maps (to stop fetching) and loop bounds (to stop computing).

    @staticmethod
    def cache_tiles(length, block_kv: int):
        """Cache tiles holding at least one valid slot (tiles past them are skipped)."""
        return idiv(length + block_kv - 1, block_kv)

    def last_query(self, row_start, block_rows: int, group: int, block_len: int):
        """Largest block position ``t`` among query rows ``[row_start, row_start + block_rows)``
        of the ``(t, g)``-ordered row axis (``row = t * group + g``)."""
        return jnp.minimum(idiv(row_start + block_rows - 1, group), block_len - 1)

    def block_tiles(self, row_start, block_rows: int, group: int, block_len: int, block_kv: int):
        """Tiles of the block's own keys that the query rows need: all of them when
        bidirectional; causal rows stop at the tile of their last position."""
        if not self.causal:
            return cdiv(block_len, block_kv)
        return idiv(self.last_query(row_start, block_rows, group, block_len), block_kv) + 1
