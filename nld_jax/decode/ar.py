"""Autoregressive decoding (the reference's ``ar_generate``), one ``lax.while_loop``.

Each row stops at its own EOS or at ``max_new_tokens``; finished rows ride along in the batch
without advancing their cache or their counters. NFE = generated tokens (the prefill's logits
give the first token and count as one forward), as the reference counts it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.config import NLDConfig
from nld_jax.decode.common import (DecodeInputs, DecodeOptions, DecodeOutput, block_hidden, decide, next_key,
                                   output_size_for, prefill, write_rows)
from nld_jax.decode.stream import emit
from nld_jax.kv_cache import KVCache

__all__ = ["ar_decode"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    cache: KVCache
    out: jax.Array  # [B, N]
    decided_at: jax.Array  # [B, N]
    n: jax.Array  # [B] tokens emitted
    done: jax.Array  # [B]
    last: jax.Array  # [B] the last emitted token (the next input)
    key: jax.Array


def ar_decode(params, lora, cache: KVCache, inputs: DecodeInputs, *, config: NLDConfig,
              options: DecodeOptions) -> tuple[DecodeOutput, KVCache]:
    del lora  # the draft LoRA is never used in causal forwards
    B = inputs.tokens.shape[0]
    N = output_size_for(options)
    eos = config.eos_token_id
    cache, last = prefill(params, config, cache, inputs, options.kernels)
    key, sub = next_key(inputs.key, options.sample)
    first, _ = decide(params, config, last, sub, inputs, options)

    def is_eos(tok):
        return (tok == eos) if eos is not None else jnp.zeros_like(tok, bool)

    ones = jnp.ones((B,), bool)
    out = write_rows(jnp.zeros((B, N), jnp.int32), first[:, None], jnp.zeros((B,), jnp.int32), ones)
    n = jnp.ones((B,), jnp.int32)
    state = _State(cache, out, jnp.zeros((B, N), jnp.int32), n,
                   is_eos(first) | (n >= options.max_new_tokens), first, key)

    def cond(s: _State):
        return jnp.any(~s.done)

    def body(s: _State):
        active = ~s.done
        hidden, k, v = block_hidden(params, config, s.cache, s.last[:, None], causal=True, lora=None,
                                    kernels=options.kernels)
        cache = s.cache.write(k, v).advance(active.astype(jnp.int32))
        key, sub = next_key(s.key, options.sample)
        tok, _ = decide(params, config, hidden[:, 0], sub, inputs, options)
        out = write_rows(s.out, tok[:, None], s.n, active)
        decided = write_rows(s.decided_at, s.n[:, None], s.n, active)  # token j comes from forward j
        n = s.n + active.astype(jnp.int32)
        done = s.done | is_eos(tok) | (n >= options.max_new_tokens)
        emit(options.stream, out, n)
        return _State(cache, out, decided, n, done, jnp.where(active, tok, s.last), key)

    s = lax.while_loop(cond, body, state)
    # AR emits nothing after a row's EOS, so every emitted token is kept; NFE = tokens.
    return DecodeOutput(s.out, s.n, s.n, s.decided_at), s.cache
