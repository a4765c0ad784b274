"""Linear self-speculation (the reference's ``linear_spec_generate``), with per-row acceptance.

    causal prefill, LoRA off (nfe = 1) -> seed; emit seed
    while emitted < max_new_tokens:
        blk = [seed, MASK * (C-1)]
        DRAFT  (LoRA on, bidirectional, cache read-only): threshold 0 fills every mask in one
               forward; threshold > 0 repeats, filling masks with confidence >= threshold (at
               least the most confident one), one forward each, until none remain
        VERIFY (LoRA off, causal, writes the cache): ar = token after each slot; accept the
               longest prefix with ar[i] == blk[i+1], plus one bonus token; roll the cache back
               to the accepted length; seed = the last accepted token; stop at the first EOS

At temperature 0 the output equals greedy AR token for token. Like the reference, the output
may overshoot ``max_new_tokens`` by up to C-1 tokens (the last accepted run is kept whole), so
that greedy outputs match the reference's exactly. The reference supports batch 1 only; here
every row drafts, verifies and accepts on its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.config import NLDConfig
from nld_jax.decode.sampling import Decision, rank_descending
from nld_jax.decode.state import Request, Rows, Track, first_index, gather_at, is_stop, write_rows
from nld_jax.attention import BlockPattern

__all__ = ["DRAFT", "VERIFY", "start", "request", "advance", "accepted_length", "emit_verified"]

DRAFT, VERIFY = 0, 1


def accepted_length(draft: jax.Array, verified: jax.Array, block_length: jax.Array | int | None = None) -> jax.Array:
    """Matched draft tokens plus one bonus: the longest run of ``verified[i] == draft[i+1]`` over
    the row's first ``block_length`` slots (default: all), plus one."""
    match = verified[:, :-1] == draft[:, 1:]
    if block_length is not None:
        i = jnp.arange(match.shape[1])[None, :]
        match = match & (i < jnp.reshape(jnp.asarray(block_length), (-1, 1)) - 1)
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32) + 1


def _new_block(track: Track, seed: jax.Array, mask_id: int) -> Track:
    slots = jnp.arange(track.width)[None, :]
    zeros = jnp.zeros_like(track.n)
    return dataclasses.replace(track, blk=jnp.where(slots == 0, seed[:, None], mask_id), phase=zeros + DRAFT,
                               steps=zeros)


def start(rows: Rows, track: Track, first, config: NLDConfig) -> Track:
    """After the prefill (which counts as a forward): emit the seed."""
    B = first.shape[0]
    out = write_rows(track.out, first[:, None], jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool))
    ones = jnp.ones((B,), jnp.int32)
    done = is_stop(first, rows.stop_ids) | (ones >= rows.max_new_tokens)
    track = dataclasses.replace(track, out=out, out_at=jnp.zeros_like(track.out_at), n=ones, nfe=ones, done=done)
    return _new_block(track, first, config.mask_token_id)


def request(rows: Rows, track: Track, config: NLDConfig) -> Request:
    B, W = track.blk.shape
    verify = track.phase == VERIFY
    pattern = BlockPattern.per_row(verify, W, valid=rows.block_length)
    return Request.of(track.blk, pattern, write=verify, lora=~verify & rows.use_lora)


def _draft(rows: Rows, track: Track, dec: Decision, mask_id: int) -> Track:
    in_block = jnp.arange(track.width)[None, :] < rows.block_length[:, None]
    is_mask = (track.blk == mask_id) & in_block
    # Threshold drafting ranks by the temperature-scaled confidence (the reference's draft); at
    # least the most confident mask is filled, so a low-confidence block still progresses.
    conf = jnp.where(is_mask, dec.confidence_t, -jnp.inf) if dec.confidence_t is not None else None
    if conf is not None:
        by_threshold = ((conf >= rows.threshold[:, None]) | (rank_descending(conf) == 0)) & is_mask
        unmask = jnp.where(rows.use_threshold[:, None], by_threshold, is_mask)
    else:  # a program without confidence never drafts by threshold
        unmask = is_mask
    blk = jnp.where(unmask, dec.tokens, track.blk)
    steps = track.steps + 1
    remaining = jnp.any((blk == mask_id) & in_block, axis=-1)
    # A draft token equal to the mask id keeps its slot masked; the reference would draft again
    # forever, here a block gets at most C draft passes.
    again = rows.use_threshold & remaining & (steps < rows.block_length)
    return dataclasses.replace(track, blk=blk, steps=steps, nfe=track.nfe + 1,
                               phase=jnp.where(again, DRAFT, VERIFY).astype(jnp.int32))


def _verify(rows: Rows, track: Track, dec: Decision, mask_id: int):
    verified = dec.tokens  # [B, W]: the greedy (or sampled) token after each slot
    accepted = accepted_length(track.blk, verified, rows.block_length)
    verified_track, seed = emit_verified(rows, track, verified, accepted)
    return _new_block(verified_track, seed, mask_id), accepted


def emit_verified(rows: Rows, track: Track, verified: jax.Array, accepted: jax.Array) -> tuple[Track, jax.Array]:
    """Emit the ``accepted [B]`` first verified tokens (through the first stop token), count the
    verify forward, and return the next seed (the last accepted token, i.e. the bonus).
    Shared by linear and quadratic self-speculation."""
    W = verified.shape[1]
    # Stop at the first stop token among the accepted ones (keep it).
    slots = jnp.arange(W)[None, :]
    stop_at = first_index(is_stop(verified, rows.stop_ids) & (slots < accepted[:, None]), W)
    emitted = jnp.minimum(accepted, stop_at + 1)
    live = ~track.done
    out = write_rows(track.out, verified, track.n, live)
    # nfe counts the forwards run so far, prefill included: the verify is forward number nfe (0-based).
    out_at = write_rows(track.out_at, jnp.broadcast_to(track.nfe[:, None], verified.shape), track.n, live)
    n = track.n + emitted
    done = track.done | (stop_at < W) | (n >= rows.max_new_tokens)
    seed = gather_at(verified, accepted - 1)
    return dataclasses.replace(track, out=out, out_at=out_at, n=n, nfe=track.nfe + 1, done=done), seed


def by_row(flag: jax.Array, on, off):
    """Per row, the tree ``on`` where ``flag [B]`` else ``off`` (rows of one step are in different
    phases). Shared by linear and quadratic self-speculation."""
    return jax.tree.map(lambda a, b: jnp.where(flag.reshape(flag.shape + (1,) * (a.ndim - 1)), a, b), on, off)


def advance(rows: Rows, track: Track, req: Request, dec: Decision, config: NLDConfig):
    mask_id = config.mask_token_id
    verify = track.phase == VERIFY
    drafted = _draft(rows, track, dec, mask_id)
    verified, accepted = _verify(rows, track, dec, mask_id)
    # all C entries were written; only the accepted ones stay
    return by_row(verify, verified, drafted), jnp.where(verify, accepted, 0)
