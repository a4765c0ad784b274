"""Autoregressive decoding (the reference's ``ar_generate``): one causal forward per token.

Each row stops at its own stop token or at its ``max_new_tokens``; NFE = generated tokens (the
prefill's logits give the first token and count as one forward), as the reference counts it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from nld_jax.config import NLDConfig
from nld_jax.decode.sampling import Decision
from nld_jax.decode.state import Request, Rows, Track, is_stop, write_rows
from nld_jax.attention import BlockPattern

__all__ = ["start", "request", "advance"]


def start(rows: Rows, track: Track, first, config: NLDConfig) -> Track:
    """After the prefill: emit the first token."""
    B = first.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    out = write_rows(track.out, first[:, None], zeros, jnp.ones((B,), bool))
    n = jnp.ones((B,), jnp.int32)
    done = is_stop(first, rows.stop_ids) | (n >= rows.max_new_tokens)
    blk = track.blk.at[:, 0].set(first)
    return dataclasses.replace(track, out=out, out_at=jnp.zeros_like(track.out_at), n=n, nfe=n, done=done, blk=blk,
                               phase=zeros, steps=zeros)


def request(rows: Rows, track: Track, config: NLDConfig) -> Request:
    B, W = track.blk.shape
    tokens = jnp.where(jnp.arange(W)[None, :] == 0, track.blk, config.mask_token_id)
    yes = jnp.ones((B,), bool)
    return Request.of(tokens, BlockPattern.causal(B, W), write=yes, lora=~yes)


def advance(rows: Rows, track: Track, req: Request, dec: Decision, config: NLDConfig):
    tok = dec.tokens[:, 0]
    live = ~track.done
    out = write_rows(track.out, tok[:, None], track.n, live)
    out_at = write_rows(track.out_at, track.n[:, None], track.n, live)  # token j comes from forward j
    n = track.n + 1
    done = track.done | is_stop(tok, rows.stop_ids) | (n >= rows.max_new_tokens)
    new = dataclasses.replace(track, out=out, out_at=out_at, n=n, nfe=n, done=done,
                              blk=track.blk.at[:, 0].set(tok))
    return new, jnp.ones_like(track.n)  # the token's K/V stays in the cache
