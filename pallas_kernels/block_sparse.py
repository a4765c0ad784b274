"""Block-sparse metadata shared by the kernels: what a (query tile, key tile) pair holds.

A static mask (the training ``block_diff`` layout) is summarised once per tile size as a table
of kinds: ``EMPTY`` (skip the tile), ``PARTIAL`` (apply the element mask) or ``FULL`` (no mask
needed), compressed per query tile (forward, dQ) and per key tile (dK/dV), on the host.

A mask that is data (the decode ``BlockPattern``) is compressed the same way inside the program:
:func:`visit_lists` turns a traced "tile holds a visible key" table into per-tile lists.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EMPTY", "PARTIAL", "FULL", "BlockSparseInfo", "cdiv", "visit_lists"]

# Kinds of a (query tile, key tile) pair.
EMPTY, PARTIAL, FULL = 0, 1, 2


def cdiv(a, b):
    return (a + b - 1) // b


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


def visit_lists(visited: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The traced counterpart of the host compression: ``visited [..., n]`` bool (tile holds a
    visible key) -> ``(index [..., n], count [...])`` int32, the visited tiles in ascending order,
    padded by repeating the last one (as :class:`BlockSparseInfo` pads), and how many there are.

    A stable sort on "not visited" puts the visited tiles first, in ascending order (a list has
    one entry per key tile: a small sort, once per call, outside the kernel).
    """
    n = visited.shape[-1]
    count = jnp.sum(visited, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~visited, axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    return jnp.where(jnp.arange(n, dtype=jnp.int32) < count[..., None], order, last), count
