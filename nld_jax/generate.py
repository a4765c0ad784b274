"""``nld_jax.generate``: the convenience API over the pure decode program, with or without a mesh.

It validates and tokenizes prompts, pads them to a power-of-two bucket and rounds the token
budget up to a power of two (so that new prompt lengths and new ``max_new_tokens`` reuse a
compiled program; each row still stops at its exact budget inside the loop), picks the
program from the one program cache (keyed by shapes, dtypes, shardings, options and runtime),
and turns the device arrays into per-row Python lists.

With a mesh (``mesh=``, or the mesh the weights were loaded onto) the program is compiled with
explicit in/out shardings from the parameter declarations: weights and LoRA as declared, KV
cache and prompts over the batch axes, results replicated so that every process can read them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import validation
from nld_jax.decode import (BLOCK_MODES, MODES, SPEC_MODES, DecodeInputs, DecodeOptions, cache_size_for,
                            context_needed, decode)
from nld_jax.decode.listeners import TokenStream, listening
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.partitioning import ShardingRules, place_global, replicated
from nld_jax.placement import Placement
from nld_jax.programs import PROGRAMS
from nld_jax.vision.prompts import multimodal_prompts

__all__ = ["GenerationResult", "NonFiniteError", "generate", "bucket_length", "budget_bucket", "resolve_settings"]

MIN_BUCKET = 16
DIFFUSION_THRESHOLD = 0.9  # NVIDIA's chat and eval default, when the checkpoint names none
# Above it sampling is uniform to float32 precision anyway; near float32's range the Gumbel noise
# T * ln(-ln u) overflows to +-inf and the argmax of the ties picks the lowest ids: a wrong result.
MAX_TEMPERATURE = 1e6
# The decoder reads top_p in float32: a positive top_p that rounds to 0 there would keep no token.
MIN_TOP_P = float(np.finfo(np.float32).tiny)


class NonFiniteError(ValueError):
    """The model produced NaN or Inf while decoding (non-finite weights or an overflow)."""


@dataclasses.dataclass
class GenerationResult:
    """Per-row outputs. ``tokens`` exclude the prompt and end after the first stop token (kept)."""

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


def budget_bucket(max_new_tokens: int, block_length: int) -> int:
    """The token capacity a program is built for: the next power of two (at least 16, at least a
    block), so that few programs serve every ``max_new_tokens``."""
    return max(MIN_BUCKET, block_length, 1 << max(max_new_tokens - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    max_new_tokens: int
    block_length: int
    threshold: float | None
    temperature: float
    top_p: float
    top_k: int
    use_lora: bool


QUADRATIC_DEFAULT_BLOCK = 8  # spec_quadratic's default k (72 tokens per forward), unless block_length says


def resolve_settings(model: NLDModel, mode: str, max_new_tokens, block_length, threshold, temperature, use_lora,
                     top_p=1.0, top_k=0) -> Settings:
    """Validate the decoding arguments and fill the defaults (the checkpoint's
    ``generation_config.json`` first, then NVIDIA's)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    defaults = getattr(model, "generation", None)
    max_new = validation.integer(max_new_tokens, "max_new_tokens", minimum=1)
    if block_length is None:
        block_length = getattr(defaults, "block_length", None) or model.config.block_size
        if mode == "spec_quadratic":
            # A quadratic forward holds k drafts and k*k masks: at the checkpoints' k=32 that is
            # 1056 tokens, compute-bound on every device (benchmarks/spec_quadratic_bench.py).
            block_length = min(block_length, QUADRATIC_DEFAULT_BLOCK)
    block = validation.integer(block_length, "block_length", minimum=1)
    if mode in SPEC_MODES and block < 2:
        raise ValueError(f"{mode} mode needs block_length >= 2 (a seed and at least one draft slot)")
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold must be a number in [0, 1], None or 'auto', got {threshold!r}")
        threshold = None
        if mode == "diffusion":
            threshold = getattr(defaults, "threshold", None)
            threshold = DIFFUSION_THRESHOLD if threshold is None else threshold
    elif threshold is not None:
        threshold = validation.probability(threshold, "threshold")
    temperature = validation.number(temperature, "temperature", minimum=0.0, maximum=MAX_TEMPERATURE)
    top_p = max(validation.probability(top_p, "top_p", allow_zero=False), MIN_TOP_P)
    # top_k >= the vocabulary keeps every token; clamped so that it fits the decoder's int32
    top_k = min(validation.integer(top_k, "top_k", minimum=0), model.config.vocab_size)
    use_lora = validation.flag(use_lora, "use_lora")
    if use_lora and model.lora is None:
        raise ValueError("use_lora=True but this checkpoint has no draft LoRA (linear_spec_lora/)")
    return Settings(mode, max_new, block if mode in BLOCK_MODES else 1, threshold, temperature, top_p, top_k,
                    use_lora and mode != "ar")


def _options(s: Settings, capacity: int, stream: bool) -> DecodeOptions:
    # Reference semantics: diffusion without a threshold uses the top-k schedule; spec's
    # threshold 0 (its default) fills the whole draft in one forward.
    use_threshold = s.threshold is not None and (s.mode == "diffusion" or s.threshold > 0)
    return DecodeOptions(mode=s.mode, max_new_tokens=capacity, block_length=max(s.block_length, 1),
                         use_threshold=use_threshold, sample=s.temperature > 0,
                         truncate=s.temperature > 0 and (s.top_p < 1.0 or s.top_k > 0), use_lora=s.use_lora,
                         stream=stream)


def _empty_cache(config, batch: int, size: int, dtype):
    return KVCache.empty(config, batch, size, dtype)


def generate(model: NLDModel, prompts, mode: str = "ar", max_new_tokens: int = 128, block_length: int | None = None,
             threshold: float | str | None = "auto", temperature: float = 0.0, use_lora: bool = False,
             seed: int | Sequence[int] = 0, *, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] | None = None, mesh=None, rules: ShardingRules | None = None,
             implementation: str = "auto", on_tokens: Callable[[int, list[int]], None] | None = None,
             embeddings=None, kv_cache: str | None = None, images=None) -> GenerationResult:
    """Generate from a batch of prompts (token-id lists, ragged allowed, or strings).

    ``mode``: ``"ar"``, ``"diffusion"`` (block diffusion), ``"spec"`` (linear self-speculation) or
    ``"spec_quadratic"`` (quadratic self-speculation: each forward verifies the previous draft
    and drafts the next block for every acceptance length).
    ``block_length`` defaults to the checkpoint's ``generation_config.json`` or ``block_size``.
    ``threshold``: ``"auto"`` means the checkpoint's ``generation_config.json`` threshold (else
    NVIDIA's 0.9) in diffusion and 0.0 (one-shot drafts) in spec; ``None`` in diffusion is
    NVIDIA's top-k schedule (one token per step). ``use_lora`` switches the draft LoRA on for the
    bidirectional (draft / denoise) forwards only. ``temperature > 0`` samples (Gumbel-max, the
    reference's rule) after ``top_p`` / ``top_k``; row b uses ``seed + b`` (or ``seed[b]``), so a
    row samples what it samples alone with that seed. ``stop_token_ids`` end a row like EOS.
    ``on_tokens(row, new_ids)`` streams tokens as the compiled loop produces them (an exception
    it raises stops the generation and is re-raised here). ``mesh`` / ``rules``: run on a mesh
    (default: the mesh the weights live on, if any). ``embeddings [B, T, D]``: prompt embeddings
    that replace the token embeddings (image features; rows padded like the prompts).
    ``kv_cache="int8"``: keys and values cached as int8 with one float32 scale per vector (about
    half a bf16 cache; every cached K/V rounded to 8 bits), default the model's dtype.
    ``images`` (a vision-language checkpoint): one list per prompt (None or [] for none) of file
    paths, PIL images or arrays; each image's tokens go where the prompt has one image token per
    image, else first (:mod:`nld_jax.vision.prompts`). Their features are computed once, before
    decoding, and enter as prompt embeddings: every mode sees them only as cached prefix.
    """
    if kv_cache not in (None, "int8"):
        raise ValueError(f"kv_cache must be None (the model's dtype) or 'int8', got {kv_cache!r}")
    s = resolve_settings(model, mode, max_new_tokens, block_length, threshold, temperature, use_lora, top_p, top_k)
    ids = validation.prompt_ids(prompts, vocab=model.config.vocab_size, tokenizer=model.tokenizer)
    if images is not None:
        ids, embeddings = _with_images(model, ids, images, embeddings)
    stops = validation.token_ids(stop_token_ids, "stop_token_ids", vocab=model.config.vocab_size)
    seeds = validation.seed_value(seed, len(ids))
    on_tokens = validation.callback(on_tokens, "on_tokens")
    longest = max(len(p) for p in ids)
    limit = model.config.max_position_embeddings
    needed = context_needed(longest, s.max_new_tokens, s.mode, s.block_length)
    if needed > limit:
        slack = needed - longest - s.max_new_tokens
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={s.max_new_tokens}"
                         + (f" + {slack} (the {s.mode} block may run past the budget)" if slack else "")
                         + f" exceeds the model's context of {limit} positions")
    options = _options(s, budget_bucket(s.max_new_tokens, s.block_length), stream=on_tokens is not None)
    place = Placement.for_model(model, mesh, rules)
    runtime = place.runtime(implementation)

    rows = len(ids)
    batch = -(-rows // place.batch_shards) * place.batch_shards
    padded = ids + [ids[-1]] * (batch - rows)  # rows are independent: padding never changes a row
    seeds = seeds + [seeds[-1]] * (batch - rows)
    bucket = bucket_length(longest)
    tokens = np.zeros((batch, bucket), np.int32)
    for row, p in enumerate(padded):
        tokens[row, :len(p)] = p
    f32 = np.float32
    host = DecodeInputs(
        tokens=tokens, lengths=np.asarray([len(p) for p in padded], np.int32),
        temperature=np.full((batch,), s.temperature, f32),
        threshold=np.full((batch,), 0.0 if s.threshold is None else s.threshold, f32),
        key=np.stack([validation.seed_key(sd) for sd in seeds]),
        max_new_tokens=np.full((batch,), s.max_new_tokens, np.int32),
        top_p=np.full((batch,), s.top_p, f32), top_k=np.full((batch,), s.top_k, np.int32),
        stop_ids=np.asarray([stops or [-1]] * batch, np.int32),
        embeddings=None if embeddings is None else _pad_embeddings(embeddings, batch, bucket, model.config.D),
        stream_id=np.int32(0))

    params, lora, _, _ = place.weights(model)
    size = cache_size_for(bucket, options)
    rank = None if lora is None else int(lora["A"].shape[-1])
    in_sh, out_sh = place.decode_shardings(model.config, host, batch, size, rank, quantized_cache=kv_cache == "int8")
    # device_put, not jnp.asarray: no eager program per input shape (which JAX would recompile after
    # the program cache releases its caches)
    inputs = jax.device_put(host) if in_sh is None else jax.tree.map(place.put, host, in_sh[3])
    cache_sh = None if out_sh is None else out_sh[1]
    alloc, _ = PROGRAMS.get(_empty_cache, (), static=dict(config=model.config, batch=batch, size=size,
                                                            dtype=jnp.dtype(jnp.int8 if kv_cache else model.dtype)),
                            out_shardings=cache_sh)
    cache = alloc()
    program, compile_seconds = PROGRAMS.get(decode, (params, lora, cache, inputs),
                                            static=dict(config=model.config, options=options, runtime=runtime),
                                            in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(2,))
    eos = model.config.eos_token_id
    listener = None if on_tokens is None else TokenStream(_first_rows(on_tokens, rows), [eos, *stops])
    start = time.perf_counter()
    with listening(listener) as stream_id:
        if listener is not None:
            inputs = dataclasses.replace(inputs, stream_id=_scalar(place, stream_id))
        out, _ = program(params, lora, cache, inputs)
        out = jax.tree.map(np.asarray, out)  # replicated under a mesh: readable on every process
        if listener is not None:  # flush what the loop did not send (e.g. a single-token generation)
            listener(out.tokens, out.num_tokens)
    seconds = time.perf_counter() - start
    bad = [b for b in range(rows) if out.nonfinite[b]]
    if bad:
        raise NonFiniteError(f"the model produced NaN or Inf while decoding row(s) {bad}: its weights or "
                             "activations are not finite (load the checkpoint with check_finite=True to find the "
                             "tensor)")
    toks = [out.tokens[b, :out.num_tokens[b]].tolist() for b in range(rows)]
    decided = [out.decided_at[b, :out.num_tokens[b]].tolist() for b in range(rows)]
    text = [model.tokenizer.decode(t) for t in toks] if model.tokenizer is not None else None
    return GenerationResult(toks, out.nfe[:rows].tolist(), s.mode, seconds, text, decided, compile_seconds)


def _with_images(model: NLDModel, ids: list[list[int]], images, embeddings):
    """``(ids with the image layouts, prompt embeddings)`` of prompts with images."""
    if embeddings is not None:
        raise ValueError("give images or embeddings, not both (image features become the prompt embeddings)")
    return multimodal_prompts(model.vision, model.vision_config, model.params, ids, images,
                              model.config.bos_token_id, model.config.max_position_embeddings)


def _first_rows(on_tokens, rows: int):
    """Batch padding rows (for the mesh) are not the caller's: keep them out of the stream."""
    return lambda row, new: on_tokens(row, new) if row < rows else None


def _scalar(place: Placement, value: int):
    host = np.int32(value)
    return jax.device_put(host) if place.mesh is None else place_global(host, replicated(place.mesh))


def _pad_embeddings(embeddings, batch: int, bucket: int, dim: int) -> np.ndarray:
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 3 or emb.shape[2] != dim or emb.shape[1] > bucket:
        raise ValueError(f"embeddings must be [B, T, {dim}] with T <= the prompt bucket {bucket}, got {emb.shape}")
    out = np.zeros((batch, bucket, dim), np.float32)
    out[:emb.shape[0], :emb.shape[1]] = emb
    out[emb.shape[0]:] = out[emb.shape[0] - 1]
    return out
