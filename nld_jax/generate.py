"""``nld_jax.generate``: the convenience wrapper over the jitted decode functions.

It validates and tokenizes prompts, pads them to a power-of-two bucket (so that a new prompt of
another length in the same bucket reuses the compiled program), reuses a donated KV cache, and
turns the device arrays into per-row Python lists.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.decode import DecodeInputs, DecodeOptions, cache_size_for, decode_jit
from nld_jax.decode.common import MODES
from nld_jax.decode.stream import TokenStream, streaming
from nld_jax.loading import NLDModel

__all__ = ["GenerationResult", "generate", "prepare_prompts", "bucket_length", "make_options"]

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    """Per-row outputs. ``tokens`` exclude the prompt and end after the first EOS (kept)."""

    tokens: list[list[int]]
    nfe: list[int]
    mode: str
    seconds: float
    text: list[str] | None = None
    decided_at: list[list[int]] | None = None  # forward index (prefill = 0) that fixed each token
    compile_seconds: float = 0.0  # tracing + XLA compilation, when this call needed a new program

    @property
    def tpf(self) -> list[float]:
        """Tokens per forward (generated tokens / NFE), per row."""
        return [len(t) / max(n, 1) for t, n in zip(self.tokens, self.nfe)]

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / max(self.seconds, 1e-9)


def bucket_length(n: int) -> int:
    """Prompts are padded to the next power of two (at least 16)."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def prepare_prompts(model: NLDModel, prompts) -> list[list[int]]:
    """Token-id lists from ``prompts`` (ids or strings), validated against the model."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists or strings")
    ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a tokenizer, and this checkpoint has none; pass token ids")
            p = model.tokenizer.encode(p)
        p = [int(t) for t in np.asarray(p).reshape(-1).tolist()]
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {model.config.vocab_size})")
        ids.append(p)
    return ids


def make_options(model: NLDModel, mode: str, max_new_tokens: int, block_length: int | None,
                 threshold: float | None, temperature: float, use_lora: bool, kernels: str = "auto",
                 stream: bool = False) -> DecodeOptions:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if use_lora and model.lora is None:
        raise ValueError("use_lora=True but this checkpoint has no draft LoRA (linear_spec_lora/)")
    block = model.config.block_size if block_length is None else int(block_length)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] or None, got {threshold}")
    # Reference semantics: diffusion without a threshold uses the top-k schedule; spec's
    # threshold 0 (its default) fills the whole draft in one forward.
    use_threshold = threshold is not None and (mode == "diffusion" or threshold > 0)
    return DecodeOptions(mode=mode, max_new_tokens=int(max_new_tokens), block_length=block,
                         use_threshold=use_threshold, sample=temperature > 0,
                         use_lora=bool(use_lora) and mode != "ar", kernels=kernels, stream=stream)


def generate(model: NLDModel, prompts, mode: str = "ar", max_new_tokens: int = 128,
             block_length: int | None = None, threshold: float | None = None, temperature: float = 0.0,
             use_lora: bool = False, seed: int = 0, *, kernels: str = "auto",
             on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
    """Generate from a batch of prompts (token-id lists, ragged allowed, or strings).

    ``mode``: ``"ar"``, ``"diffusion"`` (block diffusion) or ``"spec"`` (linear self-speculation).
    ``block_length`` defaults to the checkpoint's ``block_size``. ``threshold`` follows the
    reference: None means the top-k schedule in diffusion (one token per step) and 0.0 in spec;
    NVIDIA's chat default for diffusion is 0.9. ``use_lora`` switches the draft LoRA on for the
    bidirectional (draft / denoise) forwards only. ``on_tokens(row, new_ids)`` streams tokens as
    the compiled loop produces them.
    """
    options = make_options(model, mode, max_new_tokens, block_length, threshold, temperature, use_lora,
                           kernels, stream=on_tokens is not None)
    ids = prepare_prompts(model, prompts)
    longest = max(len(p) for p in ids)
    limit = model.config.max_position_embeddings
    if longest + options.max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={options.max_new_tokens} exceeds the "
                         f"model's context of {limit} positions")
    bucket = bucket_length(longest)
    tokens = np.zeros((len(ids), bucket), np.int32)
    for row, p in enumerate(ids):
        tokens[row, :len(p)] = p
    inputs = DecodeInputs(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([len(p) for p in ids], jnp.int32),
        temperature=jnp.asarray(temperature, jnp.float32),
        threshold=jnp.asarray(0.0 if threshold is None else threshold, jnp.float32),
        key=jax.random.PRNGKey(seed),
    )
    cache = model.take_cache(len(ids), cache_size_for(bucket, options))
    compiled, compile_seconds = _compiled(model, cache, inputs, options)
    listener = TokenStream(on_tokens, model.config.eos_token_id) if on_tokens is not None else None
    start = time.perf_counter()
    with streaming(listener):
        out, cache = compiled(model.params, model.lora, cache, inputs)
        out = jax.device_get(out)
    seconds = time.perf_counter() - start
    if listener is not None:  # flush what the loop did not send (e.g. a single-token generation)
        listener(out.tokens, out.num_tokens)
    model.return_cache(cache)

    rows = [out.tokens[b, :out.num_tokens[b]].tolist() for b in range(len(ids))]
    decided = [out.decided_at[b, :out.num_tokens[b]].tolist() for b in range(len(ids))]
    text = [model.tokenizer.decode(r) for r in rows] if model.tokenizer is not None else None
    return GenerationResult(rows, out.nfe.tolist(), mode, seconds, text, decided, compile_seconds)


_COMPILED: dict = {}
_MAX_COMPILED = 32


def _compiled(model: NLDModel, cache, inputs: DecodeInputs, options: DecodeOptions):
    """The compiled decode program for these shapes, compiling (and timing it) on first use.

    Compiling ahead of the call keeps compilation out of the generation time that the CLI and
    benchmarks report. Programs are keyed by everything that shapes them; prompts of another
    length in the same bucket hit the same entry.
    """
    abstract = jax.tree.map(lambda x: (x.shape, str(x.dtype)), (model.params, model.lora, cache, inputs))
    key = (model.config, options, str(abstract))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    compiled = decode_jit.lower(model.params, model.lora, cache, inputs, config=model.config,
                                options=options).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - start
