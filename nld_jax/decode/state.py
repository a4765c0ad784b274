"""The decode loop's state: per-row settings, per-row progress and the KV cache.

Every field is an array with a leading batch (slot) axis, so a row is independent of its
neighbours by construction and the same state serves ``generate`` (all rows start together)
and a serving engine (rows enter free slots and leave between steps).

* :class:`Rows`: what each row asked for (mode, block length, token budget, sampling settings,
  PRNG key, stop ids). Fixed while the row decodes; traced, so changing it never recompiles.
* :class:`Track`: how far each row is: its output buffer, counters, the block it works on and
  the phase of its mode (which forward comes next).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.kv_cache import KVCache
from nld_jax.attention import BlockPattern

__all__ = ["Rows", "Track", "DecodeState", "Request", "write_rows", "first_index", "is_stop", "select_rows", "gather_at"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    mode: jax.Array  # [B] int32: index into the program's modes
    block_length: jax.Array  # [B] int32: C of this row (1 for AR)
    max_new_tokens: jax.Array  # [B] int32
    temperature: jax.Array  # [B] float32 (0: greedy)
    threshold: jax.Array  # [B] float32
    use_threshold: jax.Array  # [B] bool
    top_p: jax.Array  # [B] float32 (1: off)
    top_k: jax.Array  # [B] int32 (0: off)
    use_lora: jax.Array  # [B] bool: draft LoRA in this row's bidirectional forwards
    key: jax.Array  # [B, 2] uint32: the row's PRNG key (forward f, position j use fold_in(fold_in(key, f), j))
    stop_ids: jax.Array  # [B, M] int32: EOS and other stop tokens, -1 = none


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Track:
    out: jax.Array  # [B, N] emitted (or committed) tokens
    out_at: jax.Array  # [B, N] index of the forward (prefill = 0) that fixed each token
    n: jax.Array  # [B] tokens emitted so far
    nfe: jax.Array  # [B] forwards counted as the reference counts them in the row's mode
    forwards: jax.Array  # [B] forwards run so far, prefill included (= the next forward's index)
    done: jax.Array  # [B] bool
    blk: jax.Array  # [B, W] the block being worked on (AR: blk[:, 0] is the next input)
    blk_at: jax.Array  # [B, W] forward index that revealed each slot
    phase: jax.Array  # [B] int32: the mode's next forward (e.g. denoise / commit, draft / verify)
    steps: jax.Array  # [B] int32: forwards spent on the current block (denoising steps, draft passes)
    stopped: jax.Array  # [B] bool: diffusion's EOS early stop within the block
    block_masks: jax.Array  # [B] int32: masks at the start of the block (diffusion's top-k schedule)
    nonfinite: jax.Array  # [B] bool: the row's forward produced NaN/Inf (it stops; the caller reports it)

    @classmethod
    def empty(cls, batch: int, size: int, width: int) -> "Track":
        zeros = jnp.zeros((batch,), jnp.int32)
        return cls(out=jnp.zeros((batch, size), jnp.int32), out_at=jnp.zeros((batch, size), jnp.int32),
                   n=zeros, nfe=zeros, forwards=jnp.ones((batch,), jnp.int32), done=jnp.ones((batch,), bool),
                   blk=jnp.zeros((batch, width), jnp.int32), blk_at=jnp.zeros((batch, width), jnp.int32),
                   phase=zeros, steps=zeros, stopped=jnp.zeros((batch,), bool), block_masks=zeros,
                   nonfinite=jnp.zeros((batch,), bool))

    @property
    def width(self) -> int:
        return self.blk.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    rows: Rows
    track: Track


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Request:
    """The forward a row asks for next: its block, who sees whom in it, where each block token
    sits, whether it writes the cache (causal forwards only) and where the draft LoRA is on."""

    tokens: jax.Array  # [B, W] int32
    pattern: BlockPattern
    write: jax.Array  # [B] bool: the block's K/V go into the cache (causal forwards)
    lora: jax.Array  # [B, W] bool: the draft LoRA on this token's o_proj
    offsets: jax.Array  # [B, W] int32: position of each block token after the row's cached prefix

    @classmethod
    def of(cls, tokens, pattern: BlockPattern, write, lora, offsets=None) -> "Request":
        """``lora`` per row ``[B]`` or per token ``[B, W]``; ``offsets`` default ``0..W-1``."""
        B, W = tokens.shape
        lora = jnp.broadcast_to(lora[:, None] if lora.ndim == 1 else lora, (B, W))
        if offsets is None:
            offsets = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32)[None], (B, W))
        return cls(tokens, pattern, write, lora, offsets)


def write_rows(buffer: jax.Array, values: jax.Array, start: jax.Array, active: jax.Array) -> jax.Array:
    """``buffer[b, start[b] : start[b] + W] = values[b]`` for active rows (``values [B, W]``)."""

    def row(buf, val, s, a):
        new = lax.dynamic_update_slice(buf, val.astype(buf.dtype), (s,))
        return jnp.where(a, new, buf)

    return jax.vmap(row)(buffer, values, start, active)


def first_index(hit: jax.Array, default: int) -> jax.Array:
    """Index of the first True along the last axis, ``default`` where there is none."""
    idx = jnp.argmax(hit, axis=-1)
    return jnp.where(jnp.any(hit, axis=-1), idx, default).astype(jnp.int32)


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """Whether each of ``tokens [B, ...]`` is one of its row's ``stop_ids [B, M]``."""
    ids = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + stop_ids.shape[1:])
    return jnp.any(tokens[..., None] == ids, axis=-1)


def gather_at(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[b, index[b]]`` for ``x [B, W]``."""
    return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def select_rows(pick: jax.Array, a, b):
    """Per row, ``a`` where ``pick [B]`` else ``b`` (trees of arrays with a leading batch axis)."""

    def sel(x, y):
        return jnp.where(pick.reshape(pick.shape + (1,) * (x.ndim - 1)), x, y)

    return jax.tree.map(sel, a, b)
