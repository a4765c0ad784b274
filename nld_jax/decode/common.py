"""What the three decode loops share: options, inputs and outputs, prefill, buffers.

Static choices that change the traced program live in the frozen, hashable
:class:`DecodeOptions` (a static jit argument). Everything that may change from call to call
without recompiling is an array in :class:`DecodeInputs`: the prompts (padded to a bucket
length), their true lengths, temperature, threshold and the PRNG key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.config import NLDConfig
from nld_jax.decode.sampling import choose_tokens, chosen_probability
from nld_jax.kv_cache import KVCache
from nld_jax.model import forward_hidden, greedy_head, lm_head

__all__ = ["MODES", "DecodeOptions", "DecodeInputs", "DecodeOutput", "prefill", "block_hidden", "decide",
           "write_rows", "first_index", "cache_size_for", "output_size_for", "next_key"]

MODES = ("ar", "diffusion", "spec")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static decode settings (hashable: a static argument of the jitted generate functions).

    ``use_threshold`` and ``sample`` select the algorithm; the threshold and temperature
    *values* are traced inputs, so changing them does not recompile.
    """

    mode: str = "ar"
    max_new_tokens: int = 128
    block_length: int = 32
    use_threshold: bool = False
    sample: bool = False
    use_lora: bool = False
    kernels: str = "auto"  # "auto" | "xla" | a registered kernel name (attention and greedy head)
    stream: bool = False  # send tokens to the host as they are produced (see decode/stream.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if self.mode == "spec" and self.block_length < 2:
            raise ValueError("spec mode needs block_length >= 2 (a seed and at least one draft slot)")

    @property
    def block(self) -> int:
        """Tokens per forward of the loop body (1 for AR)."""
        return 1 if self.mode == "ar" else self.block_length


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeInputs:
    tokens: jax.Array  # [B, Tp] int32, right-padded prompts
    lengths: jax.Array  # [B] int32, true prompt lengths (>= 1)
    temperature: jax.Array  # [] float32 (used when options.sample)
    threshold: jax.Array  # [] float32 (used when options.use_threshold)
    key: jax.Array  # PRNG key (used when options.sample)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    tokens: jax.Array  # [B, N] generated ids; entries past num_tokens are unspecified
    num_tokens: jax.Array  # [B] tokens to keep: through the first EOS, else all generated
    nfe: jax.Array  # [B] forwards counted as NVIDIA's reference counts them in this mode
    decided_at: jax.Array  # [B, N] 0-based index of the forward (prefill = 0) that fixed each token


def output_size_for(options: DecodeOptions) -> int:
    # AR never exceeds max_new_tokens; spec may overshoot by block-1 tokens (as the reference
    # does) and diffusion writes whole blocks, so both get one block of slack.
    return options.max_new_tokens + (0 if options.mode == "ar" else options.block_length)


def cache_size_for(prompt_bucket: int, options: DecodeOptions) -> int:
    """KV slots needed so that no write ever runs past the end (writes would clamp otherwise)."""
    return prompt_bucket + options.max_new_tokens + options.block


def next_key(key: jax.Array, sample: bool) -> tuple[jax.Array, jax.Array | None]:
    if not sample:
        return key, None
    key, sub = jax.random.split(key)
    return key, sub


def prefill(params, config: NLDConfig, cache: KVCache, inputs: DecodeInputs, kernels: str):
    """Causal forward of the padded prompts into a reset cache; hidden state of each row's last token.

    Padding sits after each row's last real token, so causal attention keeps it out of every
    real position; the cache lengths are set to the true prompt lengths, which hides it later.
    """
    B = inputs.tokens.shape[0]
    # Attend within the prompt only: an empty (zero-slot) cache, not the full one whose slots
    # are all invalid, which would cost [B, H, T, S] scores for nothing.
    empty = KVCache(cache.k[:, :, :0], cache.v[:, :, :0], jnp.zeros((B,), jnp.int32))
    hidden, k, v = forward_hidden(params, config, inputs.tokens, empty, causal=True, attn_impl=kernels)
    cache = dataclasses.replace(cache, lengths=jnp.zeros_like(cache.lengths)).write(k, v).advance(inputs.lengths)
    last = jnp.take_along_axis(hidden, (inputs.lengths - 1)[:, None, None], axis=1)[:, 0]
    return cache, last


def block_hidden(params, config: NLDConfig, cache: KVCache, tokens: jax.Array, *, causal: bool, lora,
                 kernels: str):
    """A block forward on top of the cache: hidden ``[B, C, D]`` and the block's K/V."""
    return forward_hidden(params, config, tokens, cache, causal=causal, lora=lora, attn_impl=kernels)


def decide(params, config: NLDConfig, hidden: jax.Array, key, inputs: DecodeInputs, options: DecodeOptions,
           *, with_confidence: bool = False, confidence_temperature: bool = False):
    """Tokens for ``hidden [..., D]`` and, if asked, the softmax probability of each chosen token.

    Greedy decisions go through the greedy head (argmax and its probability, no ``[..., V]``
    logits kept); sampling needs the full logits for the Gumbel noise. ``confidence_temperature``
    computes the confidence from ``softmax(logits / T)`` (the reference's speculative draft)
    instead of the raw logits (its diffusion steps). Without ``with_confidence`` the second
    result may be None.
    """
    if not options.sample:
        return greedy_head(params, config, hidden, options.kernels, with_confidence=with_confidence)
    logits = lm_head(params, config, hidden)
    tokens = choose_tokens(logits, key, inputs.temperature, True)
    if not with_confidence:
        return tokens, None
    temp = inputs.temperature if confidence_temperature else 1.0
    return tokens, chosen_probability(logits, tokens, temp)


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
