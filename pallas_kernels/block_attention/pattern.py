"""Who sees whom inside a decode block: the attention pattern as data.

A decode forward runs a block of ``T`` queries (absolute positions ``length[b] + t``) over the
row's valid cache prefix and over the block's own ``T`` keys. The cache part is always fully
visible (the first ``length[b]`` slots); the block part is described per row and position by
two small integer arrays, so that every NLD mode, and rows of different modes in one batch, are
one kind of call:

    query t sees block key u  iff  u < reach[b, t]  or  group[b, u] == group[b, t]

* causal (prefill, AR, verify, commit): ``group = t``, ``reach = t`` (keys ``u <= t``);
* bidirectional (diffusion denoising, the speculative draft): every valid position in one
  group, ``reach = 0``; padding positions past a row's ``width`` get a group of their own, so
  real queries never see them and they still see themselves (no empty softmax row);
* structured patterns (quadratic self-speculation: causal drafts, then groups of masks that see
  a prefix of the drafts and each other) are other values of the same two arrays.

Every query sees at least its own key, so no softmax row is ever empty.

The kernels evaluate the same predicate tile by tile and skip block-key tiles from
:meth:`BlockPattern.key_extent` (see ``mask.py``), so every pattern, whatever its rows, is one
compiled kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["BlockPattern"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockPattern:
    group: jax.Array  # [B, T] int32
    reach: jax.Array  # [B, T] int32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.group.shape)

    @classmethod
    def causal(cls, batch: int, width: int) -> "BlockPattern":
        t = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (batch, width))
        return cls(t, t)

    @classmethod
    def bidirectional(cls, batch: int, width: int, valid: jax.Array | int | None = None) -> "BlockPattern":
        """All of the first ``valid[b]`` positions see each other (default: the whole block)."""
        t = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (batch, width))
        valid = width if valid is None else valid
        inside = t < jnp.reshape(jnp.asarray(valid, jnp.int32), (-1, 1))
        # ``width`` is no position index, so it cannot collide with a padding position's own group.
        return cls(jnp.where(inside, width, t), jnp.zeros_like(t))

    @classmethod
    def per_row(cls, causal: jax.Array, width: int, valid: jax.Array | int | None = None) -> "BlockPattern":
        """Causal rows where ``causal [B]`` is True, bidirectional (over ``valid``) elsewhere."""
        batch = causal.shape[0]
        c, b = cls.causal(batch, width), cls.bidirectional(batch, width, valid)
        pick = causal[:, None]
        return cls(jnp.where(pick, c.group, b.group), jnp.where(pick, c.reach, b.reach))

    def visible(self) -> jax.Array:
        """Dense ``[B, T, T]`` block mask (query t, key u)."""
        T = self.group.shape[1]
        u = jnp.arange(T, dtype=jnp.int32)[None, None, :]
        return (u < self.reach[:, :, None]) | (self.group[:, None, :] == self.group[:, :, None])

    def key_extent(self) -> jax.Array:
        """``[B, T]`` int32: 1 + the largest block key each query sees (>= t + 1, its own key).

        Keys at or past it are invisible to that query: the bound the kernels skip block-key
        tiles with. Derived from :meth:`visible` rather than a formula per pattern, so that a
        structured pattern (a group spread over the block, a reach past the query) is bounded
        exactly too; the ``[B, T, T]`` compare is what the XLA path builds anyway.
        """
        T = self.group.shape[1]
        u = jnp.arange(1, T + 1, dtype=jnp.int32)
        return jnp.max(jnp.where(self.visible(), u, 0), axis=-1)
