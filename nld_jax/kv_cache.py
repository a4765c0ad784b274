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

        Callers size the cache so that ``lengths + T <= S`` always holds: dynamic_update_slice
        would otherwise clamp the start index and overwrite valid entries.
        """

        def write_row(buf, new, start):  # buf [L, S, K, Dh], new [L, T, K, Dh]
            return lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0, 0))

        write = jax.vmap(write_row, in_axes=(1, 1, 0), out_axes=1)
        return KVCache(write(self.k, k_new, self.lengths), write(self.v, v_new, self.lengths), self.lengths)

    def advance(self, n: jax.Array) -> "KVCache":
        """Accept ``n [B]`` freshly written entries per row (0 for rows that are done)."""
        return dataclasses.replace(self, lengths=self.lengths + n.astype(jnp.int32))
