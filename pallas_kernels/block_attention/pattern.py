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
* quadratic self-speculation (:meth:`BlockPattern.quadratic`): the seed and C-1 drafts causal,
  then C groups of C masks, group j seeing block keys ``0..j`` and itself; other structured
  patterns are other values of the same two arrays.

Every query sees at least its own key, so no softmax row is ever empty.

The kernels evaluate the same predicate tile by tile and visit, per query tile, only the
block-key tiles holding a key one of its queries sees (``mask.py``), so every pattern, whatever
its rows, is one compiled kernel, and a sparse one (the quadratic groups) costs its visible
tiles, not its extent.
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

    @classmethod
    def quadratic(cls, batch: int, block_length: jax.Array | int, width: int | None = None) -> "BlockPattern":
        """Quadratic self-speculation's block of width ``C + C*C`` (``C = block_length``, per row or
        one for all): the seed and drafts (positions ``0..C-1``) causal; group ``j`` (positions
        ``C + j*C ..``) sees block keys ``0..j`` and its own C positions. ``width`` (default
        ``C + C*C``; needed when ``C`` is an array) may exceed a row's: positions past it are
        padding, each its own group, so no real query sees them."""
        if width is None:
            if not isinstance(block_length, int):
                raise ValueError("width is needed when block_length is an array")
            width = block_length * (block_length + 1)
        t = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (batch, width))
        C = jnp.reshape(jnp.asarray(block_length, jnp.int32), (-1, 1))
        verify = t < C
        j = jnp.maximum(t - C, 0) // C
        in_group = ~verify & (j < C)
        # Group j's id ``width + j`` is no position index: it cannot meet a causal or padding group.
        group = jnp.where(in_group, width + j, t)
        reach = jnp.where(verify, t, jnp.where(in_group, j + 1, 0))
        return cls(group, reach)

    def visible(self) -> jax.Array:
        """Dense ``[B, T, T]`` block mask (query t, key u)."""
        T = self.group.shape[1]
        u = jnp.arange(T, dtype=jnp.int32)[None, None, :]
        return (u < self.reach[:, :, None]) | (self.group[:, None, :] == self.group[:, :, None])
