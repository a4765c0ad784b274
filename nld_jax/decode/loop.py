"""One decode loop for every mode: prefill, start, then one forward per step until every row is done.

gemma's sampler-loop pattern, flattened so that each loop step is exactly one forward for every
row: each mode module (``ar``, ``diffusion``, ``spec``) says which forward a row needs next
(:func:`request`: its block, pattern, cache write, LoRA gate) and how the row moves on from the
forward's decisions (:func:`advance`). Rows of different phases, and of different modes, share
one batched forward; a row never waits for its neighbours. :func:`step` is the unit a serving
engine calls between admitting and releasing requests; :func:`decode` is
``prefill -> start -> while_loop(step) -> read out``.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.config import NLDConfig
from nld_jax.decode import ar, diffusion, spec, spec_quadratic
from nld_jax.decode.listeners import emit
from nld_jax.decode.options import BLOCK_MODES, MODES, DecodeInputs, DecodeOptions, DecodeOutput, output_size_for
from nld_jax.decode.sampling import Decision, decide
from nld_jax.decode.state import DecodeState, Request, Rows, Track, first_index, is_stop, select_rows
from nld_jax.kv_cache import KVCache
from nld_jax.model import forward_hidden, greedy_head, lm_head
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime
from nld_jax.attention import BlockPattern

__all__ = ["StepSpec", "MODE_LOGIC", "prefill", "start", "step", "decode", "readout", "rows_for"]

MODE_LOGIC: dict[str, ModuleType] = {"ar": ar, "diffusion": diffusion, "spec": spec,
                                     "spec_quadratic": spec_quadratic}
assert tuple(MODE_LOGIC) == MODES  # Rows.mode indexes MODES in every program


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static shape of one decode step (a static jit argument).

    ``modes``: the modes this program steps (a row's ``Rows.mode`` indexes :data:`MODES`; rows of
    other modes are left as they are, so a serving engine can step some modes apart);
    ``width``: tokens per forward (the largest block length; 1 for AR only, which may step a
    state built for wider blocks: AR reads only the first slot); ``sample`` /
    ``truncate``: sampling and top-p/top-k code is present; ``lora``: the draft LoRA is applied
    (gated per row); ``confidence``: decisions carry probabilities (diffusion, threshold drafts).
    """

    modes: tuple[str, ...]
    width: int
    sample: bool = False
    truncate: bool = False
    lora: bool = False
    confidence: bool = True
    stream: bool = False
    runtime: Runtime = DEFAULT_RUNTIME

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in MODE_LOGIC]
        if unknown or not self.modes:
            raise ValueError(f"unknown decode mode(s) {unknown or self.modes}; choose from {tuple(MODE_LOGIC)}")
        if tuple(sorted(self.modes, key=MODES.index)) != self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct and in the order of {MODES}, got {self.modes}")

    @property
    def uniform(self) -> str | None:
        """The pattern every forward of this program has, when there is one (AR only: causal)."""
        return "causal" if self.modes == ("ar",) else None

    @classmethod
    def for_options(cls, options: DecodeOptions, runtime: Runtime = DEFAULT_RUNTIME) -> "StepSpec":
        confidence = options.mode == "diffusion" or (options.mode == "spec" and options.use_threshold)
        return cls(modes=(options.mode,), width=options.width, sample=options.sample, truncate=options.truncate,
                   lora=options.use_lora and options.mode != "ar", confidence=confidence, stream=options.stream,
                   runtime=runtime)


def _heads(params, config: NLDConfig, runtime: Runtime):
    return (functools.partial(lm_head, params, config, runtime=runtime),
            functools.partial(greedy_head, params, config, runtime=runtime))


def rows_for(inputs: DecodeInputs, options: DecodeOptions, config: NLDConfig) -> Rows:
    """Per-row settings of a single-mode :func:`decode` call (scalars broadcast to rows)."""
    B = inputs.tokens.shape[0]

    def per_row(x, default, dtype):
        return jnp.broadcast_to(jnp.asarray(default if x is None else x, dtype), (B,))

    key = jnp.asarray(inputs.key)
    if key.ndim == 1:
        key = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(B))
    eos = -1 if config.eos_token_id is None else config.eos_token_id
    stop = jnp.full((B, 1), eos, jnp.int32)
    if inputs.stop_ids is not None:
        stop = jnp.concatenate([stop, jnp.asarray(inputs.stop_ids, jnp.int32).reshape(B, -1)], axis=1)
    budget = per_row(inputs.max_new_tokens, options.max_new_tokens, jnp.int32)
    block = options.block_length if options.mode in BLOCK_MODES else 1
    return Rows(mode=jnp.full((B,), MODES.index(options.mode), jnp.int32), block_length=per_row(None, block, jnp.int32),
                max_new_tokens=jnp.clip(budget, 1, options.max_new_tokens),
                temperature=per_row(inputs.temperature, 0.0, jnp.float32),
                threshold=per_row(inputs.threshold, 0.0, jnp.float32),
                use_threshold=per_row(None, options.use_threshold, bool),
                top_p=per_row(inputs.top_p, 1.0, jnp.float32), top_k=per_row(inputs.top_k, 0, jnp.int32),
                use_lora=per_row(None, options.use_lora, bool), key=key.astype(jnp.uint32), stop_ids=stop)


def prefill(params, config: NLDConfig, cache: KVCache, tokens: jax.Array, lengths: jax.Array, *,
            embeddings=None, runtime: Runtime = DEFAULT_RUNTIME):
    """Causal forward of the padded prompts into a reset cache; hidden state of each row's last token.

    Padding sits after each row's last real token, so causal attention keeps it out of every
    real position; the cache lengths are set to the true prompt lengths, which hides it later.
    The prompt attends within itself only: an empty (zero-slot) cache view, not the full one
    whose slots are all invalid, which would cost ``[B, H, T, S]`` scores for nothing.
    """
    B, T = tokens.shape
    empty = KVCache(cache.k[:, :, :0], cache.v[:, :, :0], jnp.zeros((B,), jnp.int32))
    hidden, k, v = forward_hidden(params, config, tokens, empty, pattern=BlockPattern.causal(B, T), uniform="causal",
                                  embeddings=embeddings, runtime=runtime)
    cache = cache.with_lengths(jnp.zeros((B,), jnp.int32)).write(k, v, runtime=runtime).advance(lengths)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return cache, last


def start(params, config: NLDConfig, rows: Rows, track: Track, last_hidden: jax.Array, spec: StepSpec,
          start_rows: jax.Array | None = None) -> Track:
    """The first decision (from the prefill's last hidden state, forward 0) and each row's mode start.

    ``start_rows [B]`` limits the start to some rows (a serving engine admitting requests); the
    other rows keep their track.
    """
    B = rows.mode.shape[0]
    dec = decide(_heads(params, config, spec.runtime), last_hidden, rows, jnp.zeros((B,), jnp.int32),
                 sample=spec.sample, truncate=spec.truncate, confidence=False)
    first = dec.tokens[:, 0]
    fresh = dataclasses.replace(track, forwards=jnp.ones((B,), jnp.int32))
    started = [MODE_LOGIC[m].start(rows, fresh, first, config) for m in spec.modes]
    new = _by_mode(rows, spec, started)
    bad = _nonfinite(last_hidden)
    new = dataclasses.replace(new, nonfinite=bad, done=new.done | bad)
    return new if start_rows is None else select_rows(start_rows, new, track)


def _by_mode(rows: Rows, spec: StepSpec, per_mode: list):
    """Each row takes the result of its own mode (of the modes this program runs)."""
    if len(per_mode) == 1:
        return per_mode[0]
    out = per_mode[0]
    for mode, other in zip(spec.modes[1:], per_mode[1:]):
        out = select_rows(rows.mode == MODES.index(mode), other, out)
    return out


def _in_program(rows: Rows, spec: StepSpec) -> jax.Array:
    """Rows whose mode this program steps."""
    return jnp.isin(rows.mode, jnp.asarray([MODES.index(m) for m in spec.modes], jnp.int32))


def _narrowed(track: Track, width: int) -> Track:
    return dataclasses.replace(track, blk=track.blk[:, :width], blk_at=track.blk_at[:, :width])


def step(params, lora, state: DecodeState, *, config: NLDConfig, spec: StepSpec) -> DecodeState:
    """One forward for every row this program steps: each live row's mode asks for its next
    forward, the batch runs it once, and each row moves on. Rows that are done, free slots and
    rows of modes this program does not run change nothing."""
    rows, full, cache = state.rows, state.track, state.cache
    if spec.width < full.width and spec.modes != ("ar",):
        raise ValueError(f"a program of width {spec.width} can step a state of width {full.width} in AR only")
    track = _narrowed(full, spec.width) if spec.width < full.width else full
    live = ~track.done & _in_program(rows, spec)
    req: Request = _by_mode(rows, spec, [MODE_LOGIC[m].request(rows, track, config) for m in spec.modes])
    hidden, k, v = forward_hidden(params, config, req.tokens, cache, pattern=req.pattern, uniform=spec.uniform,
                                  lora=lora if spec.lora else None, lora_gate=req.lora if spec.lora else None,
                                  offsets=req.offsets, runtime=spec.runtime)
    cache = cache.write(k, v, where=req.write & live, runtime=spec.runtime)
    dec: Decision = decide(_heads(params, config, spec.runtime), hidden, rows, track.forwards, sample=spec.sample,
                           truncate=spec.truncate, confidence=spec.confidence)
    moved, grow = _by_mode(rows, spec, [MODE_LOGIC[m].advance(rows, track, req, dec, config) for m in spec.modes])
    bad = _nonfinite(hidden)
    moved = dataclasses.replace(moved, forwards=track.forwards + 1, nonfinite=bad, done=moved.done | bad)
    if track is not full:  # back to the state's width: AR touched only the first slot
        moved = dataclasses.replace(moved, blk=full.blk.at[:, :spec.width].set(moved.blk),
                                    blk_at=full.blk_at.at[:, :spec.width].set(moved.blk_at))
    return DecodeState(cache.advance(jnp.where(live, grow, 0)), rows, select_rows(live, moved, full))


def _nonfinite(hidden: jax.Array) -> jax.Array:
    """Rows whose hidden states hold NaN or Inf: decoding them further would emit garbage."""
    return ~jnp.all(jnp.isfinite(hidden), axis=tuple(range(1, hidden.ndim)))


def readout(state: DecodeState) -> DecodeOutput:
    """Each row's tokens through its first stop token (every mode emits nothing past its stop
    except diffusion, whose committed block may hold tokens after it)."""
    t = state.track
    N = t.out.shape[1]
    generated = jnp.arange(N)[None, :] < t.n[:, None]
    num = jnp.minimum(t.n, first_index(is_stop(t.out, state.rows.stop_ids) & generated, N) + 1)
    return DecodeOutput(t.out, num, t.nfe, t.out_at, t.nonfinite)


def decode(params, lora, cache: KVCache, inputs: DecodeInputs, *, config: NLDConfig, options: DecodeOptions,
           runtime: Runtime = DEFAULT_RUNTIME) -> tuple[DecodeOutput, KVCache]:
    """Generate with ``options.mode``; ``lora`` may be None unless ``options.use_lora``."""
    if options.use_lora and lora is None:
        raise ValueError("use_lora=True but this model has no draft LoRA (linear_spec_lora/ not found)")
    spec = StepSpec.for_options(options, runtime)
    B = inputs.tokens.shape[0]
    rows = rows_for(inputs, options, config)
    cache, last = prefill(params, config, cache, inputs.tokens, inputs.lengths, embeddings=inputs.embeddings,
                          runtime=runtime)
    track = start(params, config, rows, Track.empty(B, output_size_for(options), spec.width), last, spec)
    state = DecodeState(cache, rows, track)
    stream_id = jnp.asarray(0 if inputs.stream_id is None else inputs.stream_id, jnp.int32)

    def cond(carry):
        state, cancelled = carry
        return jnp.any(~state.track.done) & ~cancelled

    def body(carry):
        state, _ = carry
        state = step(params, lora, state, config=config, spec=spec)
        cancelled = emit(stream_id, state.track.out, state.track.n) if spec.stream else jnp.bool_(False)
        return state, cancelled

    state, _ = lax.while_loop(cond, body, (state, jnp.bool_(False)))
    return readout(state), state.cache
