"""Linear self-speculation (the reference's ``linear_spec_generate``), batched with per-row acceptance.

    causal prefill, LoRA off (nfe = 1) -> seed; emit seed
    while emitted < max_new_tokens:
        blk = [seed, MASK * (C-1)]
        draft (LoRA on, bidirectional, cache read-only): threshold 0 fills every mask in one
              forward; threshold > 0 repeats, filling masks with confidence >= threshold (at
              least the most confident one), one forward each, until none remain
        verify (LoRA off, causal, writes the cache): ar = token after each slot
        accept the longest prefix with ar[i] == blk[i+1], plus one bonus token; roll the cache
        back to the accepted length; seed = the last accepted token; stop at the first EOS

At temperature 0 the output equals greedy AR token for token. Like the reference, the output
may overshoot ``max_new_tokens`` by up to C-1 tokens (the last accepted run is kept whole), so
that greedy outputs match the reference's exactly. The reference supports batch 1 only; here
every row drafts, verifies and accepts independently, and rows that are done ride along.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.config import NLDConfig
from nld_jax.decode.common import (DecodeInputs, DecodeOptions, DecodeOutput, block_hidden, decide,
                                   first_index, next_key, output_size_for, prefill, write_rows)
from nld_jax.decode.sampling import rank_descending
from nld_jax.decode.stream import emit
from nld_jax.kv_cache import KVCache

__all__ = ["spec_decode", "accepted_length"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    cache: KVCache
    out: jax.Array  # [B, N]
    decided_at: jax.Array  # [B, N]
    n: jax.Array  # [B] tokens emitted
    nfe: jax.Array  # [B] prefill + draft + verify forwards
    done: jax.Array  # [B]
    seed: jax.Array  # [B]
    key: jax.Array


def accepted_length(draft: jax.Array, verified: jax.Array) -> jax.Array:
    """Matched draft tokens plus one bonus: longest run of ``verified[i] == draft[i+1]``, + 1."""
    match = verified[:, :-1] == draft[:, 1:]
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32) + 1


def _draft(params, config, options, inputs, cache, blk, active, nfe, key, lora):
    """Fill the block's masks with the bidirectional (LoRA) forward; returns (blk, nfe, key)."""
    mask_id = config.mask_token_id

    def fill(blk, key):
        hidden, _, _ = block_hidden(params, config, cache, blk, causal=False, lora=lora, kernels=options.kernels)
        key, sub = next_key(key, options.sample)
        # Only threshold drafting ranks by confidence; a one-shot draft takes every token.
        tokens, conf = decide(params, config, hidden, sub, inputs, options, with_confidence=options.use_threshold,
                              confidence_temperature=True)
        return tokens, conf, key

    if not options.use_threshold:
        tokens, _, key = fill(blk, key)
        is_mask = (blk == mask_id) & active[:, None]
        return jnp.where(is_mask, tokens, blk), nfe + active.astype(jnp.int32), key

    def pending(blk):
        return active & jnp.any(blk == mask_id, axis=-1)

    def cond(c):
        return jnp.any(pending(c[0]))

    def body(c):
        blk, nfe, key = c
        rows = pending(blk)
        tokens, conf, key = fill(blk, key)
        conf = jnp.where(blk == mask_id, conf, -jnp.inf)
        # At least the most confident mask, so that low-confidence blocks still progress.
        unmask = ((conf >= inputs.threshold) | (rank_descending(conf) == 0)) & (blk == mask_id)
        return jnp.where(unmask & rows[:, None], tokens, blk), nfe + rows.astype(jnp.int32), key

    return lax.while_loop(cond, body, (blk, nfe, key))


def spec_decode(params, lora, cache: KVCache, inputs: DecodeInputs, *, config: NLDConfig,
                options: DecodeOptions) -> tuple[DecodeOutput, KVCache]:
    B = inputs.tokens.shape[0]
    C = options.block_length
    N = output_size_for(options)
    mask_id, eos = config.mask_token_id, config.eos_token_id
    draft_lora = lora if options.use_lora else None
    slots = jnp.arange(C, dtype=jnp.int32)[None, :]

    def is_eos(tok):
        return (tok == eos) if eos is not None else jnp.zeros_like(tok, bool)

    cache, last = prefill(params, config, cache, inputs, options.kernels)
    key, sub = next_key(inputs.key, options.sample)
    seed, _ = decide(params, config, last, sub, inputs, options)
    ones = jnp.ones((B,), jnp.int32)
    out = write_rows(jnp.zeros((B, N), jnp.int32), seed[:, None], jnp.zeros((B,), jnp.int32), ones > 0)
    state = _State(cache, out, jnp.zeros((B, N), jnp.int32), ones, ones,
                   is_eos(seed) | (ones >= options.max_new_tokens), seed, key)

    def body(s: _State) -> _State:
        live = ~s.done
        blk = jnp.where(slots == 0, s.seed[:, None], mask_id)
        blk, nfe, key = _draft(params, config, options, inputs, s.cache, blk, live, s.nfe, s.key, draft_lora)

        hidden, k, v = block_hidden(params, config, s.cache, blk, causal=True, lora=None, kernels=options.kernels)
        key, sub = next_key(key, options.sample)
        verified, _ = decide(params, config, hidden, sub, inputs, options)  # [B, C]
        accepted = accepted_length(blk, verified)
        # Stop at the first EOS among the accepted tokens (keep it).
        eos_at = first_index(is_eos(verified) & (slots < accepted[:, None]), C)
        emitted = jnp.minimum(accepted, eos_at + 1)
        # All C entries are written; only the accepted ones are kept (the rest is rolled back).
        cache = s.cache.write(k, v).advance(jnp.where(live, accepted, 0))
        out = write_rows(s.out, verified, s.n, live)
        # nfe counts the forwards run so far, prefill included: the verify is forward number nfe (0-based).
        decided = write_rows(s.decided_at, jnp.broadcast_to(nfe[:, None], (B, C)), s.n, live)
        n = s.n + jnp.where(live, emitted, 0)
        done = s.done | (eos_at < C) | (n >= options.max_new_tokens)
        seed = jnp.take_along_axis(verified, (accepted - 1)[:, None], axis=-1)[:, 0]
        nfe = nfe + live.astype(jnp.int32)
        emit(options.stream, out, n)
        return _State(cache, out, decided, n, nfe, done, jnp.where(live, seed, s.seed), key)

    s = lax.while_loop(lambda s: jnp.any(~s.done), body, state)
    return DecodeOutput(s.out, s.n, s.nfe, s.decided_at), s.cache
