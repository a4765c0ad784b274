"""The ``block_diff`` training mask over ``[x_t noisy (L) | x_0 clean (L)]`` (NLD_SPEC.md section 4).

One predicate, :func:`block_diff_visible`, serves every form of it: the dense mask of the XLA
implementation (:func:`block_diff_mask`, the block length may be traced) and the per-tile table
(:class:`BlockDiffMask`, static) that the kernels skip empty tiles with.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import idiv, irem
from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL, BlockSparseInfo, cdiv

__all__ = ["block_diff_visible", "block_diff_mask", "BlockDiffMask"]


def block_diff_visible(q, k, L: int, block_length, xp=jnp, div=operator.floordiv, rem=operator.mod):
    """The ``block_diff`` predicate on query / key indices of the ``[noisy | clean]`` layout.

    With ``blk(i) = (i mod L) // b``: noisy q -> noisy k iff same block; noisy q -> clean k iff
    ``blk(q) > blk(k)``; clean q -> clean k iff ``q >= k``; clean q -> noisy k never. ``xp`` is
    ``jax.numpy`` (traced, e.g. a traced ``block_length``) or ``numpy`` (host-side tile tables);
    kernels pass their own ``div`` / ``rem`` where ``//`` and ``%`` do not lower.
    """
    q_clean, k_clean = q >= L, k >= L
    q_blk, k_blk = div(rem(q, L), block_length), div(rem(k, L), block_length)
    noisy_noisy = ~q_clean & ~k_clean & (q_blk == k_blk)
    noisy_clean = ~q_clean & k_clean & (q_blk > k_blk)
    clean_clean = q_clean & k_clean & (q >= k)
    return xp.asarray(noisy_noisy | noisy_clean | clean_clean)


def block_diff_mask(L: int, block_length) -> jax.Array:
    """``[2L, 2L]`` bool: may query i attend to key j. ``block_length`` may be traced, so one
    compiled train step serves every block length."""
    idx = jnp.arange(2 * L)
    return block_diff_visible(idx[:, None], idx[None, :], L, block_length)


@dataclasses.dataclass(frozen=True)
class BlockDiffMask:
    """The ``block_diff`` training mask over ``[x_t noisy | x_0 clean]`` (NLD_SPEC.md section 4).

    With ``blk(i) = (i mod L) // b``: noisy q -> noisy k iff same block; noisy q -> clean k iff
    ``blk(q) > blk(k)``; clean q -> clean k iff ``q >= k``; clean q -> noisy k never.
    """

    seq_len: int  # L, the length of each half
    block_length: int  # b

    def __post_init__(self):
        if self.seq_len < 1 or self.block_length < 1:
            raise ValueError(f"seq_len and block_length must be >= 1, got {self.seq_len}, {self.block_length}")

    @property
    def shape(self) -> tuple[int, int]:
        return (2 * self.seq_len, 2 * self.seq_len)

    def __call__(self, q, k):
        """The predicate on (broadcastable, non-negative) query and key indices; numpy in, numpy out."""
        traced = isinstance(q, jnp.ndarray) or isinstance(k, jnp.ndarray)
        if traced:  # inside kernels: integer division that lowers on every backend
            return block_diff_visible(q, k, self.seq_len, self.block_length, xp=jnp, div=idiv, rem=irem)
        return block_diff_visible(q, k, self.seq_len, self.block_length, xp=np)

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
    nq, nk = cdiv(n, block_q), cdiv(n, block_kv)
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
