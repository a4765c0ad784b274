"""Block diffusion decoding (the reference's ``generate`` with ``causal_context=True``).

Outer ``lax.while_loop`` over blocks, inner one over denoising steps, the cache read-only while
denoising and written by one causal commit per block (NLD_SPEC.md section 5):

    causal prefill (not counted) -> seed = token after the prompt
    per block: blk = [seed, MASK * (C-1)]
        up to C denoising steps while the row has masks: bidirectional forward, unmask by
        confidence (top-k schedule, or threshold + top-1), stop early once the row has an EOS
        with no mask before it
        commit: causal forward of blk (writes the cache); seed = token after the block

Unlike the reference, rows are independent: each row has its own early stop, its own
completion and its own NFE (the reference stops denoising every row when one row finishes).

``max_new_tokens`` need not be a multiple of the block length: the last block keeps its full
width C, but only its first ``max_new_tokens - generated`` slots are unmasked; the remaining
MASK slots stay as right context that is never decoded (what the model was trained with).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.config import NLDConfig
from nld_jax.decode.common import (DecodeInputs, DecodeOptions, DecodeOutput, block_hidden, decide,
                                   first_index, next_key, output_size_for, prefill, write_rows)
from nld_jax.decode.sampling import select_transfer
from nld_jax.decode.stream import emit
from nld_jax.kv_cache import KVCache

__all__ = ["diffusion_decode", "denoise_step"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    cache: KVCache
    out: jax.Array  # [B, N]
    decided_at: jax.Array  # [B, N]
    n: jax.Array  # [B] tokens generated (committed blocks, valid slots only)
    nfe: jax.Array  # [B] denoise + commit forwards
    forwards: jax.Array  # [B] forwards including prefill (for decided_at)
    done: jax.Array  # [B]
    seed: jax.Array  # [B] first token of the next block
    seed_at: jax.Array  # [B] forward index that decided the seed
    key: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _BlockState:
    blk: jax.Array  # [B, C]
    blk_at: jax.Array  # [B, C] forward index that revealed each slot
    step: jax.Array  # [] denoising step within the block
    stopped: jax.Array  # [B] EOS early stop
    nfe: jax.Array
    forwards: jax.Array
    key: jax.Array


def denoise_step(params, config, hidden, blk, is_mask, key, inputs: DecodeInputs, options: DecodeOptions, budget):
    """One unmasking decision: returns the updated block and which slots were revealed."""
    # Confidence is the softmax of the raw logits, as in the reference's diffusion steps.
    x0, conf = decide(params, config, hidden, key, inputs, options, with_confidence=True)
    transfer = select_transfer(conf, is_mask, budget, inputs.threshold, options.use_threshold)
    return jnp.where(transfer, x0, blk), transfer


def _eos_stop(blk, mask_id: int, eos: int | None):
    """The reference's early stop: an EOS with no MASK before the first EOS."""
    if eos is None:
        return jnp.zeros(blk.shape[:1], bool)
    is_eos = blk == eos
    after_first_eos = jnp.cumsum(is_eos, axis=-1) > 0
    mask_before = (blk == mask_id) & ~after_first_eos
    return jnp.any(is_eos, axis=-1) & ~jnp.any(mask_before, axis=-1)


def diffusion_decode(params, lora, cache: KVCache, inputs: DecodeInputs, *, config: NLDConfig,
                     options: DecodeOptions) -> tuple[DecodeOutput, KVCache]:
    B = inputs.tokens.shape[0]
    C = options.block_length
    N = output_size_for(options)
    mask_id, eos = config.mask_token_id, config.eos_token_id
    draft_lora = lora if options.use_lora else None
    slots = jnp.arange(C, dtype=jnp.int32)[None, :]

    cache, last = prefill(params, config, cache, inputs, options.kernels)
    key, sub = next_key(inputs.key, options.sample)
    seed, _ = decide(params, config, last, sub, inputs, options)
    zeros = jnp.zeros((B,), jnp.int32)
    state = _State(cache, jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), jnp.int32), zeros, zeros,
                   jnp.ones((B,), jnp.int32), jnp.zeros((B,), bool), seed, zeros, key)

    def block_body(s: _State) -> _State:
        live = ~s.done
        valid = jnp.minimum(options.max_new_tokens - s.n, C)  # slots of this block that count
        blk = jnp.where(slots == 0, s.seed[:, None], mask_id)
        blk_at = jnp.where(slots == 0, s.seed_at[:, None], 0)
        # Like the reference, "masked" means "holds the mask id" (a seed or a prediction equal to
        # the mask id stays masked); slots past ``valid`` are never decoded.
        decodable = slots < valid[:, None]
        # Top-k schedule without threshold: masks split evenly over C steps, remainder first.
        n_masks = jnp.sum((blk == mask_id) & decodable, axis=-1)
        base, extra = n_masks // C, n_masks % C

        def has_work(b: _BlockState):
            pending = jnp.any((b.blk == mask_id) & decodable, axis=-1)
            return live & pending & ~b.stopped

        def step_cond(b: _BlockState):
            return (b.step < C) & jnp.any(has_work(b))

        def step_body(b: _BlockState) -> _BlockState:
            active = has_work(b)
            hidden, _, _ = block_hidden(params, config, s.cache, b.blk, causal=False, lora=draft_lora,
                                        kernels=options.kernels)
            key, sub = next_key(b.key, options.sample)
            is_mask = (b.blk == mask_id) & decodable & active[:, None]
            budget = base + (b.step < extra).astype(jnp.int32)
            new_blk, revealed = denoise_step(params, config, hidden, b.blk, is_mask, sub, inputs, options, budget)
            blk_at = jnp.where(revealed, b.forwards[:, None], b.blk_at)
            stopped = b.stopped | (active & _eos_stop(new_blk, mask_id, eos))
            inc = active.astype(jnp.int32)
            return _BlockState(new_blk, blk_at, b.step + 1, stopped, b.nfe + inc, b.forwards + inc, key)

        b = lax.while_loop(step_cond, step_body,
                           _BlockState(blk, blk_at, jnp.int32(0), jnp.zeros((B,), bool), s.nfe, s.forwards, s.key))

        # Commit: one causal forward of the block writes its K/V and yields the next seed.
        hidden, k, v = block_hidden(params, config, s.cache, b.blk, causal=True, lora=None, kernels=options.kernels)
        cache = s.cache.write(k, v).advance(jnp.where(live, C, 0))
        key, sub = next_key(b.key, options.sample)
        next_seed, _ = decide(params, config, hidden[:, C - 1], sub, inputs, options)
        out = write_rows(s.out, b.blk, s.n, live)
        decided = write_rows(s.decided_at, b.blk_at, s.n, live)
        n = s.n + jnp.where(live, valid, 0)
        inc = live.astype(jnp.int32)
        eos_in_block = (b.blk == eos) & (slots < valid[:, None]) if eos is not None else jnp.zeros_like(decodable)
        done = s.done | jnp.any(eos_in_block, axis=-1) | (n >= options.max_new_tokens)
        emit(options.stream, out, n)
        return _State(cache, out, decided, n, b.nfe + inc, b.forwards + inc, done,
                      jnp.where(live, next_seed, s.seed), jnp.where(live, b.forwards, s.seed_at), key)

    s = lax.while_loop(lambda s: jnp.any(~s.done), block_body, state)
    num = s.n
    if eos is not None:
        gen = jnp.arange(N)[None, :] < s.n[:, None]
        num = jnp.minimum(s.n, first_index((s.out == eos) & gen, N) + 1)
    return DecodeOutput(s.out, num, s.nfe, s.decided_at), s.cache
