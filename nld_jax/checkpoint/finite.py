"""The finiteness check of loaded weights: a NaN or Inf in any weight is an error naming the tensor.

A non-finite weight does not fail loudly by itself: it turns some logits into NaN, which the
decode loop then reports far from the cause (``NonFiniteError``), or into nothing visible at
all when the NaN sits in a row that is never used. The check is a pass over host memory
(``np.isfinite`` in slices, measured at about 2.5 GB/s for bf16 and 15 GB/s for float32 on
one busy CPU core), so :func:`default_on` turns it on below :data:`DEFAULT_LIMIT_BYTES`.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

__all__ = ["DEFAULT_LIMIT_BYTES", "default_on", "first_nonfinite", "first_nonfinite_in_placed"]

# Weights up to 1 GiB (in the loaded dtype) are checked unless the caller says otherwise: at
# 2.5 GB/s that is at most ~0.4 s, small next to reading them. Bigger models opt in.
DEFAULT_LIMIT_BYTES = 2**30
_SLICE = 1 << 22  # elements per np.isfinite call: bounds the temporary bool array to 4 MB


def default_on(weight_bytes: int) -> bool:
    return weight_bytes <= DEFAULT_LIMIT_BYTES


def first_nonfinite(host: np.ndarray) -> int | None:
    """The flat index of the first NaN/Inf of ``host``, or None (integer arrays are finite)."""
    if host.dtype.kind in "biu":
        return None
    flat = host.reshape(-1)
    for start in range(0, flat.size, _SLICE):
        ok = np.isfinite(flat[start:start + _SLICE])
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def first_nonfinite_in_placed(leaves: dict[str, jax.Array], stacked: Callable[[str], bool]) -> tuple[str, int | None] | None:
    """``(leaf, layer)`` of a placed array holding a NaN/Inf (``layer`` None for unstacked leaves),
    or None. Each process checks the shards it holds, on the host; in a multi-process run the
    processes then agree, so that all of them raise, not only the one holding the bad shard."""
    names = list(leaves)
    found = (len(names), 0)  # (leaf index, layer); len(names): nothing found
    for i, name in enumerate(names):
        for shard in leaves[name].addressable_shards:
            host = np.asarray(shard.data)
            at = first_nonfinite(host)
            if at is not None:
                layer = (shard.index[0].start or 0) + int(np.unravel_index(at, host.shape)[0]) if host.ndim else 0
                found = min(found, (i, layer))
        if found[0] < len(names):
            break
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(np.asarray(found, np.int64))).reshape(-1, 2)
        found = min((int(i), int(layer)) for i, layer in every)
    if found[0] == len(names):
        return None
    name = names[found[0]]
    return name, (found[1] if stacked(name) else None)
