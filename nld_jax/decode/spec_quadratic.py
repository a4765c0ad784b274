"""Quadratic self-speculation (NVIDIA's tech report, section 3.4 and appendix C, after TiDAR): one
forward verifies the previous draft and drafts the next block for every possible acceptance.

With block length C (a seed and C-1 draft tokens, as in linear spec), one QUAD forward holds::

    [ s  d1 ... d(C-1) | G0 | G1 | ... | G(C-1) ]        width C + C*C
      causal: verify     group Gj: C masks at the positions that follow d_j

* ``s`` (the last accepted token, whose K/V is not cached yet) and the drafts ``d1..d(C-1)`` run
  causally, so their causal logits verify the drafts exactly as linear spec's verify does
  (longest matching prefix plus the bonus token) and their K/V are written to the cache
  (rolled back to what is accepted).
* Group ``Gj`` sees the cached prefix, ``s, d1..dj`` and itself (bidirectionally), and sits at
  the positions right after ``dj``: if exactly j drafts are accepted, the bonus token lands on
  Gj's first slot (the AR token is kept there, as in every self-speculation) and Gj's other C-1
  slots are the next block's drafts, drafted from the same forward. The groups' K/V are never
  cached (drafts read the cache, never write it).

The first forward after the prefill has no drafts to verify yet: it is a plain draft
(``[s, MASK * (C-1)]``, bidirectional), then every forward is a QUAD forward. The draft LoRA,
when on, runs on the mask groups only (per token); the seed and drafts run without it, as
linear spec's verify does. At temperature 0 the output equals greedy AR token for token, since
only verified tokens are ever emitted. Threshold drafting does not apply (drafts are one-shot).

The attention pattern is :meth:`BlockPattern.quadratic <nld_jax.attention.BlockPattern>` data
(the kernels skip the block tiles it leaves empty); positions come in ``Request.offsets``. Rows may use different C (up to the program's).

Cost: one QUAD forward does (C+1)x the matmul FLOPs of a linear-spec forward of C tokens but reads
the weights once, where a linear iteration (draft + verify) reads them twice. It pays where a
forward of C + C*C tokens costs about what one of C tokens does (a GPU at batch 1 up to a few
hundred tokens), not on a compute-bound CPU beyond C = 2-3: ``benchmarks/spec_quadratic_bench.py``
measures TPF and tokens/s against linear spec and AR and prints the FLOP and byte counts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nld_jax.attention import BlockPattern
from nld_jax.config import NLDConfig
from nld_jax.decode.sampling import Decision
from nld_jax.decode.spec import accepted_length, by_row, emit_verified
from nld_jax.decode.state import Request, Rows, Track, is_stop, write_rows

__all__ = ["DRAFT", "QUAD", "width_for", "block_for", "start", "request", "advance"]

DRAFT, QUAD = 0, 1


def width_for(block_length: int) -> int:
    """Tokens per QUAD forward: the seed and drafts, and one group of C masks after each."""
    return block_length * (block_length + 1)


def block_for(width: int) -> int:
    """The largest block length C whose QUAD forward fits ``width`` (the inverse of width_for)."""
    return (math.isqrt(4 * width + 1) - 1) // 2


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Per row and block slot: which part it is and where it sits."""

    verify: jax.Array  # [B, W] the seed and drafts (slots 0..C-1)
    in_group: jax.Array  # [B, W] a mask of a group
    group: jax.Array  # [B, W] the group index j of a group slot
    slot: jax.Array  # [B, W] position inside its group
    offsets: jax.Array  # [B, W] position after the cached prefix


def _layout(C: jax.Array, W: int) -> _Layout:
    t = jnp.arange(W, dtype=jnp.int32)[None, :]
    C = C[:, None]
    verify = t < C
    rel = jnp.maximum(t - C, 0)
    group, slot = rel // C, rel % C
    in_group = ~verify & (group < C)
    offsets = jnp.where(verify, t, jnp.where(in_group, group + 1 + slot, 0))
    return _Layout(verify, in_group, group, slot, offsets)


def _quad_block(rows: Rows, track: Track, seed: jax.Array, drafts: jax.Array, mask_id: int) -> jax.Array:
    """``[seed, drafts (C-1) | MASK * C*C | padding]``; ``drafts [B, W]`` aligned at slot 1."""
    lay = _layout(rows.block_length, track.width)
    t = jnp.arange(track.width)[None, :]
    return jnp.where(t == 0, seed[:, None], jnp.where(lay.verify, drafts, mask_id))


def start(rows: Rows, track: Track, first, config: NLDConfig) -> Track:
    """After the prefill (which counts as a forward): emit the seed; a plain draft comes next."""
    B = first.shape[0]
    out = write_rows(track.out, first[:, None], jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool))
    ones = jnp.ones((B,), jnp.int32)
    done = is_stop(first, rows.stop_ids) | (ones >= rows.max_new_tokens)
    blk = jnp.where(jnp.arange(track.width)[None, :] == 0, first[:, None], config.mask_token_id)
    zeros = jnp.zeros_like(ones)
    return dataclasses.replace(track, out=out, out_at=jnp.zeros_like(track.out_at), n=ones, nfe=ones, done=done,
                               blk=blk, phase=zeros + DRAFT, steps=zeros)


def request(rows: Rows, track: Track, config: NLDConfig) -> Request:
    B, W = track.blk.shape
    C = rows.block_length
    quad = track.phase == QUAD
    lay = _layout(C, W)
    t = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32)[None, :], (B, W))
    # QUAD: the verify part causal; group j sees s, d1..dj and itself; padding sees itself.
    structured = BlockPattern.quadratic(B, C, W)
    draft = BlockPattern.bidirectional(B, W, valid=C)  # DRAFT: [s, MASK * (C-1)] see each other
    pick = quad[:, None]
    pattern = BlockPattern(jnp.where(pick, structured.group, draft.group),
                           jnp.where(pick, structured.reach, draft.reach))
    offsets = jnp.where(pick, lay.offsets, t)
    lora = rows.use_lora[:, None] & (lay.in_group | ~pick)  # groups in QUAD, the whole draft in DRAFT
    return Request.of(track.blk, pattern, write=quad, lora=lora, offsets=offsets)


def _draft(rows: Rows, track: Track, dec: Decision, mask_id: int) -> Track:
    """The first forward: a one-shot draft of the whole block."""
    seed = track.blk[:, 0]
    blk = _quad_block(rows, track, seed, dec.tokens, mask_id)  # dec.tokens[j] drafts slot j
    return dataclasses.replace(track, blk=blk, nfe=track.nfe + 1, phase=jnp.full_like(track.phase, QUAD),
                               steps=track.steps + 1)


def _quad(rows: Rows, track: Track, dec: Decision, mask_id: int):
    C, W = rows.block_length, track.width
    Cmax = block_for(W)
    verified = dec.tokens[:, :Cmax]  # causal: the token after each of s, d1, ..., d(C-1)
    accepted = accepted_length(track.blk[:, :Cmax], verified, C)
    emitted, seed = emit_verified(rows, track, verified, accepted)
    # Group a = accepted - 1 (the drafts accepted) holds the next drafts in its slots 1..C-1.
    lay = _layout(C, W)
    chosen = lay.in_group & (lay.group == (accepted - 1)[:, None]) & (lay.slot >= 1)
    # Scatter them to block slots 1..C-1: slot s of the group -> block slot s.
    target = jnp.where(chosen, lay.slot, W)  # W: dropped
    drafts = jnp.zeros_like(track.blk).at[jnp.arange(track.blk.shape[0])[:, None], target].set(dec.tokens,
                                                                                             mode="drop")
    blk = _quad_block(rows, track, seed, drafts, mask_id)
    return dataclasses.replace(emitted, blk=blk, steps=track.steps + 1), accepted


def advance(rows: Rows, track: Track, req: Request, dec: Decision, config: NLDConfig):
    mask_id = config.mask_token_id
    quad = track.phase == QUAD
    drafted = _draft(rows, track, dec, mask_id)
    verified, accepted = _quad(rows, track, dec, mask_id)
    # The whole block was written; only the seed and the accepted drafts stay.
    return by_row(quad, verified, drafted), jnp.where(quad, accepted, 0)
