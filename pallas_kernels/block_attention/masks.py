"""NLD's attention masks as objects: one predicate, a dense form and block-sparse metadata.

The dense form feeds the jnp references; the metadata tells a kernel which key tiles a query
tile must visit (and which of those need no element mask at all), so that empty tiles are
skipped, not masked. Keeping both derived from the same predicate is what makes the reference
a trustworthy oracle for the kernels' skipping logic.

* :class:`CacheBlockMask`: a decode block of ``T`` queries over the key axis
  ``[cache (S slots, the first length[b] valid) | the block's own T keys]``, causal or
  bidirectional within the block (NLD_SPEC.md section 4). Lengths are traced values, so its
  metadata is a pair of cheap integer formulas that the kernels evaluate in their index maps.
* :class:`BlockDiffMask`: the training layout ``[x_t noisy | x_0 clean]`` (each length ``L``);
  static, so its metadata is a numpy table computed once per (mask, tile sizes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import idiv, irem

__all__ = ["CacheBlockMask", "BlockDiffMask", "BlockSparseInfo", "EMPTY", "PARTIAL", "FULL"]

# Kinds of a (query tile, key tile) pair.
EMPTY, PARTIAL, FULL = 0, 1, 2


def _cdiv(a, b):
    return (a + b - 1) // b


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
            return _cdiv(block_len, block_kv)
        return idiv(self.last_query(row_start, block_rows, group, block_len), block_kv) + 1


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseInfo:
    """Per-tile kinds of a static mask, and the same table compressed per query tile (forward
    and dQ: which key tiles to visit) and per key tile (dK/dV: which query tiles to visit).

    Compressed lists are padded to a common length by repeating the last visited tile with
    kind ``EMPTY``: a kernel whose index map follows the list then re-requests the tile it
    already holds (no DMA) and skips the step.
    """

    block_q: int
    block_kv: int
    kind: np.ndarray  # [nq, nk] int8

    @functools.cached_property
    def by_query(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(kv_index [nq, n], kv_kind [nq, n], kv_count [nq])`` int32."""
        return _compress(self.kind)

    @functools.cached_property
    def by_key(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(q_index [nk, n], q_kind [nk, n], q_count [nk])`` int32."""
        return _compress(self.kind.T)

    @property
    def density(self) -> float:
        """Fraction of tiles visited (the work a dense kernel would do is 1.0)."""
        return float(np.mean(self.kind != EMPTY))


def _compress(kind: np.ndarray):
    rows, _ = kind.shape
    counts = (kind != EMPTY).sum(axis=1).astype(np.int32)
    width = max(int(counts.max(initial=0)), 1)
    index = np.zeros((rows, width), np.int32)
    kinds = np.zeros((rows, width), np.int32)
    for r in range(rows):
        (cols,) = np.nonzero(kind[r])
        if len(cols):
            index[r, :len(cols)] = cols
            index[r, len(cols):] = cols[-1]
            kinds[r, :len(cols)] = kind[r, cols]
    return index, kinds, counts


@dataclasses.dataclass(frozen=True)
class BlockDiffMask:
    """The ``block_diff`` training mask over ``[x_t noisy | x_0 clean]`` (NLD_SPEC.md section 4).

    With ``blk(i) = (i mod L) // b``: noisy q -> noisy k iff same block; noisy q -> clean k iff
    ``blk(q) > blk(k)``; clean q -> clean k iff ``q >= k``; clean q -> noisy k never.
    """

    seq_len: int  # L, the length of each half
    block_size: int  # b

    def __post_init__(self):
        if self.seq_len < 1 or self.block_size < 1:
            raise ValueError(f"seq_len and block_size must be >= 1, got {self.seq_len}, {self.block_size}")

    @property
    def shape(self) -> tuple[int, int]:
        return (2 * self.seq_len, 2 * self.seq_len)

    def __call__(self, q, k):
        """The predicate on (broadcastable, non-negative) query and key indices; numpy in, numpy out."""
        from nld_jax.training.objective import block_diff_visible  # the one definition of the mask

        traced = isinstance(q, jnp.ndarray) or isinstance(k, jnp.ndarray)
        if traced:  # inside kernels: integer division that lowers on every backend
            return block_diff_visible(q, k, self.seq_len, self.block_size, xp=jnp, div=idiv, rem=irem)
        return block_diff_visible(q, k, self.seq_len, self.block_size, xp=np)

    def materialize(self) -> np.ndarray:
        """Dense ``[2L, 2L]`` boolean mask."""
        n = 2 * self.seq_len
        return self(np.arange(n)[:, None], np.arange(n)[None, :])

    def block_info(self, block_q: int, block_kv: int) -> BlockSparseInfo:
        return _block_diff_info(self, block_q, block_kv)


@functools.lru_cache(maxsize=64)
def _block_diff_info(mask: BlockDiffMask, block_q: int, block_kv: int) -> BlockSparseInfo:
    # One query tile at a time: [block_q, 2L] booleans, never the whole [2L, 2L] at once.
    n = 2 * mask.seq_len
    nq, nk = _cdiv(n, block_q), _cdiv(n, block_kv)
    kind = np.zeros((nq, nk), np.int8)
    cols = np.arange(nk * block_kv)
    for i in range(nq):
        rows = np.arange(i * block_q, min((i + 1) * block_q, n))
        # Key columns past 2L are padding: treated as masked, so a ragged last key tile is
        # never FULL and the kernel masks its out-of-range columns.
        dense = mask(rows[:, None], cols[None, :]) & (cols[None, :] < n)
        dense = dense.reshape(len(rows), nk, block_kv)
        any_ = dense.any(axis=(0, 2))
        all_ = dense.all(axis=(0, 2))
        kind[i] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    return BlockSparseInfo(block_q, block_kv, kind)
