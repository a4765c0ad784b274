"""Block diffusion decoding (the reference's ``generate`` with ``causal_context=True``).

Per block, as NLD_SPEC.md section 5 describes it, one forward per loop step:

    causal prefill (not counted) -> seed = token after the prompt
    per block: blk = [seed, MASK * (C-1)]
        DENOISE, up to C times while the row has masks: bidirectional forward (cache read-only),
                 unmask by confidence (top-k schedule, or threshold + top-1); stop early once
                 the block has an EOS with no mask before it
        COMMIT:  causal forward of blk (writes the cache); seed = token after the block

Unlike the reference, rows are independent: each row has its own early stop, its own
completion and its own NFE (the reference stops denoising every row when one row finishes),
and a row that finished denoising commits at once instead of waiting for the others.

``max_new_tokens`` need not be a multiple of the block length: the last block keeps its full
width C, but only its first ``max_new_tokens - generated`` slots are unmasked; the remaining
MASK slots stay as right context that is never decoded (what the model was trained with).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.config import NLDConfig
from nld_jax.decode.sampling import Decision, select_transfer
from nld_jax.decode.state import Request, Rows, Track, gather_at, is_stop, write_rows
from nld_jax.attention import BlockPattern

__all__ = ["DENOISE", "COMMIT", "start", "request", "advance", "new_block"]

DENOISE, COMMIT = 0, 1


def _slots(track: Track) -> jax.Array:
    return jnp.arange(track.width, dtype=jnp.int32)[None, :]


def _decodable(rows: Rows, track: Track, n: jax.Array) -> jax.Array:
    """Slots of the block that count: the first ``min(max_new - n, C)``."""
    valid = jnp.minimum(rows.max_new_tokens - n, rows.block_length)
    return _slots(track) < valid[:, None]


def new_block(rows: Rows, track: Track, seed: jax.Array, seed_at: jax.Array, mask_id: int) -> Track:
    """``blk = [seed, MASK * (C-1)]``; straight to COMMIT when no slot is left to decode."""
    slots = _slots(track)
    blk = jnp.where(slots == 0, seed[:, None], mask_id)
    blk_at = jnp.where(slots == 0, seed_at[:, None], 0)
    # Like the reference, "masked" means "holds the mask id" (a seed equal to the mask id is a
    # mask too); slots past the valid ones are never decoded.
    masks = (blk == mask_id) & _decodable(rows, track, track.n)
    block_masks = jnp.sum(masks, axis=-1).astype(jnp.int32)
    phase = jnp.where(block_masks > 0, DENOISE, COMMIT).astype(jnp.int32)
    zeros = jnp.zeros_like(track.n)
    return dataclasses.replace(track, blk=blk, blk_at=blk_at, phase=phase, steps=zeros,
                               stopped=jnp.zeros_like(track.done), block_masks=block_masks)


def start(rows: Rows, track: Track, first, config: NLDConfig) -> Track:
    """After the prefill: the first token seeds the first block (and is emitted with it)."""
    B = first.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    track = dataclasses.replace(track, n=zeros, nfe=zeros, done=jnp.zeros((B,), bool))
    return new_block(rows, track, first, zeros, config.mask_token_id)


def request(rows: Rows, track: Track, config: NLDConfig) -> Request:
    B, W = track.blk.shape
    commit = track.phase == COMMIT
    # Denoising sees the whole C-wide block (masks past the valid slots are right context).
    pattern = BlockPattern.per_row(commit, W, valid=rows.block_length)
    return Request.of(track.blk, pattern, write=commit, lora=~commit & rows.use_lora)


def _eos_stop(blk: jax.Array, in_block: jax.Array, stop_ids: jax.Array, mask_id: int) -> jax.Array:
    """The reference's early stop: a stop token with no MASK before the first one."""
    stop = is_stop(blk, stop_ids) & in_block
    after_first = jnp.cumsum(stop, axis=-1) > 0
    mask_before = (blk == mask_id) & in_block & ~after_first
    return jnp.any(stop, axis=-1) & ~jnp.any(mask_before, axis=-1)


def _denoise(rows: Rows, track: Track, dec: Decision, mask_id: int) -> Track:
    C = rows.block_length
    decodable = _decodable(rows, track, track.n)
    is_mask = (track.blk == mask_id) & decodable
    # Top-k schedule without threshold: masks split evenly over C steps, remainder first.
    budget = track.block_masks // C + (track.steps < track.block_masks % C).astype(jnp.int32)
    # Confidence is the softmax of the raw logits, as in the reference's diffusion steps.
    transfer = select_transfer(dec.confidence, is_mask, budget, rows.threshold, rows.use_threshold)
    blk = jnp.where(transfer, dec.tokens, track.blk)
    blk_at = jnp.where(transfer, track.forwards[:, None], track.blk_at)
    in_block = _slots(track) < C[:, None]
    stopped = track.stopped | _eos_stop(blk, in_block, rows.stop_ids, mask_id)
    steps = track.steps + 1
    pending = jnp.any((blk == mask_id) & decodable, axis=-1)
    phase = jnp.where(pending & ~stopped & (steps < C), DENOISE, COMMIT).astype(jnp.int32)
    return dataclasses.replace(track, blk=blk, blk_at=blk_at, stopped=stopped, steps=steps, phase=phase,
                               nfe=track.nfe + 1)


def _commit(rows: Rows, track: Track, dec: Decision, mask_id: int) -> Track:
    C = rows.block_length
    valid = jnp.minimum(rows.max_new_tokens - track.n, C)
    live = ~track.done
    out = write_rows(track.out, track.blk, track.n, live)
    out_at = write_rows(track.out_at, track.blk_at, track.n, live)
    stop_in_block = jnp.any(is_stop(track.blk, rows.stop_ids) & (_slots(track) < valid[:, None]), axis=-1)
    n = track.n + valid
    done = track.done | stop_in_block | (n >= rows.max_new_tokens)
    seed = gather_at(dec.tokens, C - 1)  # the token after the block
    committed = dataclasses.replace(track, out=out, out_at=out_at, n=n, done=done, nfe=track.nfe + 1)
    return new_block(rows, committed, seed, track.forwards, mask_id)


def advance(rows: Rows, track: Track, req: Request, dec: Decision, config: NLDConfig):
    mask_id = config.mask_token_id
    commit = track.phase == COMMIT
    denoised, committed = _denoise(rows, track, dec, mask_id), _commit(rows, track, dec, mask_id)
    new = jax.tree.map(lambda c, d: jnp.where(commit.reshape(commit.shape + (1,) * (c.ndim - 1)), c, d),
                       committed, denoised)
    grow = jnp.where(commit, rows.block_length, 0)  # the committed block's K/V stays in the cache
    return new, grow
