"""A static-shape KV cache with per-row lengths.

``k`` and ``v`` are ``[L, B, S, K, Dh]``; ``lengths [B]`` counts the valid entries of each row.
Entries at or past a row's length are garbage: attention masks them, and the next write
overwrites them. Speculative rollback is therefore just a smaller ``lengths``.

The cache only ever holds causal K/V (NLD_SPEC.md section 4): bidirectional (diffusion and
draft) forwards read it and never write it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.config import NLDConfig

__all__ = ["KVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, Dh]
    v: jax.Array  # [L, B, S, K, Dh]
    lengths: jax.Array  # [B] int32

    @classmethod
    def empty(cls, config: NLDConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.L, batch, size, config.K, config.Dh)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, k_new: jax.Array, v_new: jax.Array, where: jax.Array | None = None) -> "KVCache":
        """Write ``[L, B, T, K, Dh]`` at each row's current length; lengths are not advanced.

        ``where [B]`` (default: every row) selects the rows that write; the others keep their
        entries bit for bit (their slice is read and written back), so a finished row or a row
        in a bidirectional (read-only) forward never touches its cache. One
        ``dynamic_update_slice`` per row, in a loop over rows: each is an in-place update of the
        loop-carried (and, at the jit boundary, donated) cache. (A vmapped update becomes a
        scatter that XLA may materialise as full-cache copies; a plain scatter is slow on CPU.)
        Callers size the cache so that ``lengths + T <= S`` holds for every row that writes:
        dynamic_update_slice would clamp the start index otherwise.
        """
        k_new, v_new = k_new.astype(self.k.dtype), v_new.astype(self.v.dtype)
        T = k_new.shape[2]

        def write_row(b, kv):
            k, v = kv
            start = (0, b, self.lengths[b], 0, 0)
            row_k = lax.dynamic_slice_in_dim(k_new, b, 1, axis=1)
            row_v = lax.dynamic_slice_in_dim(v_new, b, 1, axis=1)
            if where is not None:
                size = (k.shape[0], 1, T, k.shape[3], k.shape[4])
                row_k = jnp.where(where[b], row_k, lax.dynamic_slice(k, start, size))
                row_v = jnp.where(where[b], row_v, lax.dynamic_slice(v, start, size))
            return lax.dynamic_update_slice(k, row_k, start), lax.dynamic_update_slice(v, row_v, start)

        k, v = lax.fori_loop(0, self.batch, write_row, (self.k, self.v), unroll=self.batch <= 8)
        return KVCache(k, v, self.lengths)

    def advance(self, n: jax.Array) -> "KVCache":
        """Accept ``n [B]`` freshly written entries per row (0 for rows that are done)."""
        return dataclasses.replace(self, lengths=self.lengths + n.astype(jnp.int32))

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

    def prefix(self, size: int) -> "KVCache":
        """A view of the first ``size`` slots (a prefill attends within the prompt only)."""
        return KVCache(self.k[:, :, :size], self.v[:, :, :size], self.lengths)
