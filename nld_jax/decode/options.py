"""The public contract of :func:`nld_jax.decode.decode`: static options, traced inputs, outputs.

Static choices that change the traced program live in the frozen, hashable
:class:`DecodeOptions` (a static jit argument). Everything that may change from call to call
without recompiling is an array in :class:`DecodeInputs`: the prompts (padded to a bucket
length), their true lengths, per-row token budgets, temperature, threshold, top-p / top-k, the
PRNG keys and optional prompt embeddings.
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["MODES", "BLOCK_MODES", "SPEC_MODES", "DecodeOptions", "DecodeInputs", "DecodeOutput", "output_size_for",
           "cache_size_for", "context_needed"]

MODES = ("ar", "diffusion", "spec", "spec_quadratic")
BLOCK_MODES = ("diffusion", "spec", "spec_quadratic")  # modes whose forwards are whole blocks
SPEC_MODES = ("spec", "spec_quadratic")  # self-speculation: a seed and block_length - 1 drafts


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static decode settings (hashable: a static argument of the jitted decode functions).

    ``max_new_tokens`` is the *capacity* the program is built for (output buffer and KV cache);
    each row may ask for fewer with ``DecodeInputs.max_new_tokens`` without a new program.
    ``use_threshold``, ``sample`` and ``truncate`` select the algorithm; the threshold,
    temperature and top-p / top-k *values* are traced inputs.
    """

    mode: str = "ar"
    max_new_tokens: int = 128
    block_length: int = 32
    use_threshold: bool = False
    sample: bool = False
    truncate: bool = False  # apply the rows' top-p / top-k before sampling
    use_lora: bool = False
    stream: bool = False  # hand tokens to a host listener as the loop produces them (decode/listeners.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if self.mode in SPEC_MODES and self.block_length < 2:
            raise ValueError(f"{self.mode} mode needs block_length >= 2 (a seed and at least one draft slot)")

    @property
    def width(self) -> int:
        """Tokens per forward of the loop body (1 for AR; a seed, its drafts and one group of
        masks after each for quadratic self-speculation)."""
        if self.mode == "spec_quadratic":
            return self.block_length * (self.block_length + 1)
        return self.block_length if self.mode in BLOCK_MODES else 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeInputs:
    tokens: jax.Array  # [B, Tp] int32, right-padded prompts
    lengths: jax.Array  # [B] int32, true prompt lengths (>= 1)
    temperature: jax.Array  # [] or [B] float32 (used when options.sample)
    threshold: jax.Array  # [] or [B] float32 (used when options.use_threshold)
    key: jax.Array  # a PRNG key (uint32 [2]: row b uses fold_in(key, b)) or one per row ([B, 2])
    max_new_tokens: jax.Array | None = None  # [] or [B] int32 <= options.max_new_tokens (None: the capacity)
    top_p: jax.Array | None = None  # [] or [B] float32 in (0, 1] (used when options.truncate)
    top_k: jax.Array | None = None  # [] or [B] int32, 0 = off (used when options.truncate)
    stop_ids: jax.Array | None = None  # [B, M] int32 extra stop tokens besides EOS, -1 = none
    embeddings: jax.Array | None = None  # [B, Tp, D] prompt embeddings replacing the token embeddings
    stream_id: jax.Array | None = None  # [] int32: which host listener receives the tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    tokens: jax.Array  # [B, N] generated ids; entries past num_tokens are unspecified
    num_tokens: jax.Array  # [B] tokens to keep: through the first stop token, else all generated
    nfe: jax.Array  # [B] forwards counted as NVIDIA's reference counts them in this mode
    decided_at: jax.Array  # [B, N] 0-based index of the forward (prefill = 0) that fixed each token
    nonfinite: jax.Array  # [B] bool: the row stopped because a forward produced NaN or Inf


def output_size_for(options: DecodeOptions) -> int:
    # AR never exceeds max_new_tokens; spec may overshoot by block-1 tokens (as the reference
    # does) and diffusion writes whole blocks, so the block modes get one block of slack.
    return options.max_new_tokens + (options.block_length if options.mode in BLOCK_MODES else 0)


def cache_size_for(prompt_bucket: int, options: DecodeOptions) -> int:
    """KV slots needed so that no write ever runs past the end (writes would clamp otherwise):
    a live row holds at most ``prompt + max_new_tokens - 1`` entries and writes one forward's width."""
    return prompt_bucket + options.max_new_tokens + options.width


def context_needed(prompt_length: int, max_new_tokens: int, mode: str, block_length: int) -> int:
    """Positions a generation can touch: spec may run ``block_length - 1`` tokens past
    ``max_new_tokens`` and diffusion's last block reaches as far; quadratic spec's last mask
    group drafts a whole block beyond its last draft."""
    if mode == "spec_quadratic":
        return prompt_length + max_new_tokens + 2 * block_length - 1
    return prompt_length + max_new_tokens + (block_length - 1 if mode in BLOCK_MODES else 0)
