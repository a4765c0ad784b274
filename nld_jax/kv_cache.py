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

    def write(self, k_new: jax.Array, v_new: jax.Array) -> "KVCache":
        """Write ``[L, B, T, K, Dh]`` at each row's current length; lengths are not advanced.

        One ``dynamic_update_slice`` per row, in a loop over rows: each is an in-place update of
        the loop-carried (and, at the jit boundary, donated) cache. (A vmapped update becomes a
        scatter that XLA may materialise as full-cache copies; a plain scatter is slow on CPU.)
        Callers size the cache so that ``lengths + T <= S`` always holds, since the start index
        of dynamic_update_slice would otherwise be clamped.
        """
        k_new, v_new = k_new.astype(self.k.dtype), v_new.astype(self.v.dtype)

        def write_row(b, kv):
            k, v = kv
            start = (0, b, self.lengths[b], 0, 0)
            k = lax.dynamic_update_slice(k, lax.dynamic_slice_in_dim(k_new, b, 1, axis=1), start)
            v = lax.dynamic_update_slice(v, lax.dynamic_slice_in_dim(v_new, b, 1, axis=1), start)
            return k, v

        k, v = lax.fori_loop(0, self.batch, write_row, (self.k, self.v), unroll=self.batch <= 8)
        return KVCache(k, v, self.lengths)

    def advance(self, n: jax.Array) -> "KVCache":
        """Accept ``n [B]`` freshly written entries per row (0 for rows that are done)."""
        return dataclasses.replace(self, lengths=self.lengths + n.astype(jnp.int32))
