"""A static-shape KV cache with per-row lengths.

``k`` and ``v`` are ``[L, B, S, K, Dh]``; ``lengths [B]`` counts the valid entries of each row.
Entries at or past a row's length are garbage: attention masks them, and the next write
overwrites them. Speculative rollback is therefore just a smaller ``lengths``.

The cache only ever holds causal K/V (NLD_SPEC.md section 4): bidirectional (diffusion and
draft) forwards read it and never write it.

An int8 cache (``KVCache.empty(..., dtype=jnp.int8)``) stores each written key and value vector
as int8 with one float32 scale per (layer, row, slot, KV head) (``k_scale``, ``v_scale``
``[L, B, S, K]``, absmax over ``Dh``: 1/32 of the int8 bytes at ``Dh = 128``); :meth:`read`
gives them back in the compute dtype inside the forward. It roughly halves a bf16 cache
(quarters a float32 one) at the cost of rounding every cached K/V to 8 bits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax import quant
from nld_jax.config import NLDConfig
from nld_jax.params import CACHE_AXES
from nld_jax.partitioning import DEFAULT_RULES, ShardingRules, cache_shardings
from nld_jax.runtime import Runtime

__all__ = ["KVCache", "dequantize_kv"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, Dh]
    v: jax.Array  # [L, B, S, K, Dh]
    lengths: jax.Array  # [B] int32
    k_scale: jax.Array | None = None  # [L, B, S, K] float32, int8 caches only
    v_scale: jax.Array | None = None

    @classmethod
    def empty(cls, config: NLDConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        """Zeros; ``dtype`` int8 makes an int8 cache with per-vector scales."""
        shape = (config.L, batch, size, config.K, config.Dh)
        if jnp.dtype(dtype) == jnp.int8:
            return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), jnp.zeros((batch,), jnp.int32),
                       jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-1], jnp.float32))
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @classmethod
    def shardings(cls, config: NLDConfig, mesh, batch: int, size: int, rules: ShardingRules = DEFAULT_RULES,
                  quantized: bool = False) -> "KVCache":
        """A cache whose leaves are the shardings of a ``[batch, size]`` cache on ``mesh``."""
        return cls(**cache_shardings(config, mesh, batch, size, rules, quantized=quantized))

    @property
    def quantized(self) -> bool:
        return self.k.dtype == jnp.int8

    def read(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``(k, v)`` in ``dtype`` (dequantized for an int8 cache)."""
        return dequantize_kv(self.k, self.k_scale, dtype), dequantize_kv(self.v, self.v_scale, dtype)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, k_new: jax.Array, v_new: jax.Array, where: jax.Array | None = None,
              runtime: Runtime | None = None) -> "KVCache":
        """Write ``[L, B, T, K, Dh]`` at each row's current length; lengths are not advanced.

        ``where [B]`` (default: every row) selects the rows that write; the others keep their
        entries bit for bit (their slice is read and written back), so a finished row or a row
        in a bidirectional (read-only) forward never touches its cache. One
        ``dynamic_update_slice`` per row, in a loop over rows: each is an in-place update of the
        loop-carried (and, at the jit boundary, donated) cache. (A vmapped update becomes a
        scatter that XLA may materialise as full-cache copies; a plain scatter is slow on CPU.)
        Under a mesh (``runtime``) the loop runs on each device's own rows inside ``shard_map``:
        a row index that XLA cannot see through would make it gather the whole cache onto every
        device at every step. Callers size the cache so that ``lengths + T <= S`` holds for
        every row that writes: dynamic_update_slice would clamp the start index otherwise.
        """
        where = jnp.ones((self.batch,), bool) if where is None else where
        if self.quantized:
            k_new, k_scale = _quantize(k_new)
            v_new, v_scale = _quantize(v_new)
            cached, new = (self.k, self.v, self.k_scale, self.v_scale), (k_new, v_new, k_scale, v_scale)
        else:
            cached, new = (self.k, self.v), (k_new.astype(self.k.dtype), v_new.astype(self.v.dtype))
        n = len(cached)

        def write(*args):  # flat positional arrays, as shard_kernel splits them
            return _write_rows(args[:n], args[n], args[n + 1:2 * n + 1], args[-1])

        if runtime is not None and runtime.sharded:
            axes = [CACHE_AXES[name] for name in ("k", "v", "k_scale", "v_scale")[:n]]
            new_axes = [("layers", "batch", "seq", "act_kv_heads", "head_dim")] * 2 + \
                [("layers", "batch", "seq", "act_kv_heads")] * 2
            write = runtime.shard_kernel(write, [*axes, ("batch",), *new_axes[:n], ("batch",)], list(axes))
        out = write(*cached, self.lengths, *new, where)
        return dataclasses.replace(self, k=out[0], v=out[1], **({"k_scale": out[2], "v_scale": out[3]}
                                                                 if self.quantized else {}))

    def advance(self, n: jax.Array) -> "KVCache":
        """Accept ``n [B]`` freshly written entries per row (0 for rows that are done)."""
        return dataclasses.replace(self, lengths=self.lengths + n.astype(jnp.int32))

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

    def prefix(self, size: int) -> "KVCache":
        """A view of the first ``size`` slots (a prefill attends within the prompt only)."""
        scales = {} if not self.quantized else {"k_scale": self.k_scale[:, :, :size], "v_scale": self.v_scale[:, :, :size]}
        return KVCache(self.k[:, :, :size], self.v[:, :, :size], self.lengths, **scales)


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., Dh]`` -> int8 and a float32 scale per vector (absmax over ``Dh``)."""
    q = quant.quantize_array(x, (-1,), "int8")
    return q.w, q.scale


def dequantize_kv(x: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """Cached keys or values ``[..., Dh]`` in ``dtype`` (an int8 cache's times its per-vector scale)."""
    if x.dtype != jnp.int8:
        return x.astype(dtype)
    if scale is None:  # a zero-slot view (the prefill's): nothing to scale
        return x.astype(dtype)
    return (x.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _write_rows(cached, lengths, new, where):
    """``c[:, b, lengths[b]:lengths[b] + T] = n[:, b]`` for each cached array ``c`` (k, v and,
    int8, their scales) and its new block ``n``, for the rows where ``where``."""
    T, batch = new[0].shape[2], cached[0].shape[1]

    def write_row(b, arrays):
        out = []
        for c, n in zip(arrays, new):
            start = (0, b, lengths[b]) + (0,) * (c.ndim - 3)
            size = (c.shape[0], 1, T) + c.shape[3:]
            row = jnp.where(where[b], lax.dynamic_slice_in_dim(n, b, 1, axis=1), lax.dynamic_slice(c, start, size))
            out.append(lax.dynamic_update_slice(c, row, start))
        return tuple(out)

    return lax.fori_loop(0, batch, write_row, tuple(cached), unroll=batch <= 8)
