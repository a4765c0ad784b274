"""The continuous-batching engine: a fixed number of slots over one static KV cache, rows of any
mode side by side, requests entering free slots and leaving between steps.

It is built from the decode loop's own pieces (:mod:`nld_jax.decode.loop`), so there is one
implementation of each algorithm: a slot is admitted by a causal prefill of its prompt (in
chunks, into its rows of the cache) and :func:`~nld_jax.decode.loop.start`; every engine step is
:func:`~nld_jax.decode.loop.step`, the very function ``generate``'s ``while_loop`` runs. A row
therefore decodes exactly what ``generate`` gives it alone: its mode, block length, threshold,
sampling settings, PRNG key and stop ids are its own (traced, so no request recompiles
anything), and the sampling noise of a row depends on its own forward count only.

Programs, compiled once per engine (all donate the state):

* ``prefill``: one prompt chunk of one slot (chunk sizes 16, 32, ... up to ``prefill_chunk``);
* ``start``: the slot's settings and its first token (the prompt's last hidden state);
* ``step``: one forward for the rows of some modes. Every program computes all the slots (its
  shapes are static), live or not, so what a step costs depends on the programs it runs, not on
  the rows they advance. ``ar_steps`` says where AR rows go: ``"narrow"``, a program of width 1
  of their own (in the block width they would push a whole block of tokens through every matmul
  for one token); ``"wide"``, the block program; ``"auto"`` (the default), the block program
  while any block row is live (it computes the AR rows' slots anyway, so a second program would
  only add its cost) and the width-1 program when only AR rows are
  (``benchmarks/serve_bench.py`` measures the three). Each has a greedy and a sampling variant,
  chosen per step by the rows that run.
* ``retire``: a cancelled slot stops at once.

Thread-safety: an :class:`Engine` is driven by one thread (the scheduler's).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nld_jax.attention import BlockPattern
from nld_jax.decode import MODES, DecodeState, Rows, StepSpec, Track, start, step
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.model import forward_hidden
from nld_jax.runtime import Runtime
from nld_jax import validation

__all__ = ["EngineConfig", "SlotSettings", "Engine", "Snapshot"]

MIN_CHUNK = 16
AR_STEPS = ("auto", "narrow", "wide")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape of an engine: what its programs are compiled for.

    ``max_len``: the context a request may use (prompt + new tokens + the block overshoot of the
    block modes); default the model's context, at most 2048. ``max_new_tokens``: the largest
    budget a request may ask for. ``block_width``: the widest ``block_length`` (default the
    checkpoint's ``block_size``).
    """

    slots: int = 8
    max_len: int | None = None
    max_new_tokens: int = 512
    block_width: int | None = None
    prefill_chunk: int = 256
    max_stop_ids: int = 8
    implementation: str = "auto"
    ar_steps: str = "auto"

    def __post_init__(self):
        for name in ("slots", "max_new_tokens", "prefill_chunk", "max_stop_ids"):
            validation.integer(getattr(self, name), name, minimum=1)
        if self.prefill_chunk < MIN_CHUNK or self.prefill_chunk & (self.prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= {MIN_CHUNK}, got {self.prefill_chunk}")
        if self.ar_steps not in AR_STEPS:
            raise ValueError(f"ar_steps must be one of {AR_STEPS}, got {self.ar_steps!r}")


@dataclasses.dataclass(frozen=True)
class SlotSettings:
    """One request's decoding settings, validated (see :func:`nld_jax.generate.resolve_settings`)."""

    mode: str
    max_new_tokens: int
    block_length: int
    threshold: float | None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    use_lora: bool = False
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    @property
    def use_threshold(self) -> bool:
        # Reference semantics: diffusion without a threshold uses the top-k schedule; spec's
        # threshold 0 fills the whole draft in one forward.
        return self.threshold is not None and (self.mode == "diffusion" or self.threshold > 0)

    @property
    def samples(self) -> bool:
        return self.temperature > 0


@dataclasses.dataclass
class Snapshot:
    """What the host reads after a step: per slot, tokens emitted so far and whether it is done."""

    out: np.ndarray  # [B, N]
    n: np.ndarray  # [B]
    nfe: np.ndarray  # [B]
    done: np.ndarray  # [B]
    nonfinite: np.ndarray  # [B]


def _chunk_sizes(limit: int) -> list[int]:
    return [1 << k for k in range(int(math.log2(MIN_CHUNK)), int(math.log2(limit)) + 1)]


class Engine:
    """Slots, the device state and the compiled programs (see the module docstring)."""

    def __init__(self, model: NLDModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        mc = model.config
        self.width = config.block_width or mc.block_size
        self.max_len = min(config.max_len or min(mc.max_position_embeddings, 2048), mc.max_position_embeddings)
        if self.max_len < 2:
            raise ValueError(f"max_len {self.max_len} leaves no room for a prompt and a token")
        self.capacity = config.max_new_tokens + self.width  # spec may overshoot by a block
        self.cache_size = self.max_len + max(self.width, config.prefill_chunk)
        self.has_lora = model.lora is not None
        self.runtime = Runtime(config.implementation)
        B = config.slots
        self.state = DecodeState(
            KVCache.empty(mc, B, self.cache_size, model.dtype),
            Rows(mode=jnp.zeros((B,), jnp.int32), block_length=jnp.ones((B,), jnp.int32),
                 max_new_tokens=jnp.ones((B,), jnp.int32), temperature=jnp.zeros((B,)), threshold=jnp.zeros((B,)),
                 use_threshold=jnp.zeros((B,), bool), top_p=jnp.ones((B,)), top_k=jnp.zeros((B,), jnp.int32),
                 use_lora=jnp.zeros((B,), bool), key=jnp.zeros((B, 2), jnp.uint32),
                 stop_ids=jnp.full((B, config.max_stop_ids + 1), -1, jnp.int32)),
            Track.empty(B, self.capacity, self.width))
        # Every leaf its own buffer: the programs donate the state, and a buffer shared by two
        # leaves (Track.empty reuses its zeros) cannot be donated twice.
        self.state = jax.tree.map(lambda x: jnp.array(x, copy=True), self.state)
        self._compile()

    # ------------------------------------------------------------------ programs

    def _spec(self, modes, width, sample: bool) -> StepSpec:
        return StepSpec(modes=tuple(modes), width=width, sample=sample, truncate=sample,
                        lora=self.has_lora and modes != ("ar",), confidence=modes != ("ar",), runtime=self.runtime)

    def _compile(self) -> None:
        config, runtime = self.model.config, self.runtime
        self._prefill = {}
        for size in _chunk_sizes(self.config.prefill_chunk):
            for first in (True, False):
                self._prefill[size, first] = jax.jit(
                    functools.partial(_prefill_chunk, config=config, runtime=runtime, first=first),
                    donate_argnums=(1,))
        self._start = {sample: jax.jit(functools.partial(_start_slot, config=config,
                                                         spec=self._spec(MODES, self.width, sample)),
                                       donate_argnums=(1,))
                       for sample in (False, True)}
        block_modes = ("diffusion", "spec") if self.config.ar_steps == "narrow" else MODES
        self._groups = [(block_modes, self.width)] + ([(("ar",), 1)] if self.config.ar_steps != "wide" else [])
        self._step = {(modes, sample): jax.jit(functools.partial(step, config=config,
                                                                  spec=self._spec(modes, width, sample)),
                                               donate_argnums=(2,))
                      for modes, width in self._groups for sample in (False, True)}
        self._retire = jax.jit(_retire, donate_argnums=(0,))

    # ------------------------------------------------------------------ slots

    def admit(self, slot: int, prompt: list[int], settings: SlotSettings) -> None:
        """Prefill ``prompt`` into ``slot`` (chunk by chunk) and start decoding it."""
        for chunk in self.prefill_chunks(slot, prompt):
            chunk()
        self.start(slot, settings)

    def prefill_chunks(self, slot: int, prompt: list[int]):
        """The prefill of ``slot`` as a list of callables, one per chunk, so that a scheduler can
        interleave them with decode steps of the running rows."""
        self.check_fits(len(prompt), 0, "ar", 1)
        limit = self.config.prefill_chunk
        chunks = []
        for begin in range(0, len(prompt), limit):
            part = prompt[begin:begin + limit]
            size = max(MIN_CHUNK, 1 << max(len(part) - 1, 0).bit_length())
            tokens = np.zeros((1, size), np.int32)
            tokens[0, :len(part)] = part
            chunks.append(functools.partial(self._run_prefill, slot, tokens, len(part), size, begin == 0))
        return chunks

    def _run_prefill(self, slot, tokens, n_valid, size, first) -> None:
        self.state, self._last = self._prefill[size, first](self.model.params, self.state, jnp.int32(slot),
                                                            jnp.asarray(tokens), jnp.int32(n_valid))

    def start(self, slot: int, settings: SlotSettings) -> None:
        """After the prefill: the slot's settings, its first token, its mode's start."""
        row = self.row_settings(settings)
        self.state = self._start[settings.samples](self.model.params, self.state, jnp.int32(slot), self._last, row)

    def row_settings(self, s: SlotSettings) -> Rows:
        if s.block_length > self.width:
            raise ValueError(f"block_length {s.block_length} exceeds this engine's block width {self.width}")
        if s.max_new_tokens > self.config.max_new_tokens:
            raise ValueError(f"max_new_tokens {s.max_new_tokens} exceeds this engine's limit "
                             f"{self.config.max_new_tokens}")
        if len(s.stop_ids) > self.config.max_stop_ids:
            raise ValueError(f"{len(s.stop_ids)} stop tokens; this engine takes at most {self.config.max_stop_ids}")
        if s.use_lora and not self.has_lora:
            raise ValueError("use_lora=True but this checkpoint has no draft LoRA (linear_spec_lora/)")
        eos = self.model.config.eos_token_id
        stops = [-1 if eos is None else eos, *s.stop_ids]
        stops += [-1] * (self.config.max_stop_ids + 1 - len(stops))
        one = lambda value, dtype: jnp.asarray([value], dtype)  # noqa: E731
        return Rows(mode=one(MODES.index(s.mode), jnp.int32), block_length=one(s.block_length, jnp.int32),
                    max_new_tokens=one(s.max_new_tokens, jnp.int32), temperature=one(s.temperature, jnp.float32),
                    threshold=one(0.0 if s.threshold is None else s.threshold, jnp.float32),
                    use_threshold=one(s.use_threshold, bool), top_p=one(s.top_p, jnp.float32),
                    top_k=one(s.top_k, jnp.int32), use_lora=one(s.use_lora and s.mode != "ar", bool),
                    key=jnp.asarray(validation.seed_key(s.seed)[None], jnp.uint32),
                    stop_ids=jnp.asarray([stops], jnp.int32))

    def check_fits(self, prompt_len: int, max_new_tokens: int, mode: str, block_length: int) -> None:
        from nld_jax.decode import context_needed

        needed = context_needed(prompt_len, max_new_tokens, mode, block_length)
        if needed > self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens}"
                             + (f" + {block_length - 1} (block overshoot)" if mode != "ar" else "")
                             + f" exceeds the server's context of {self.max_len} positions")

    def retire(self, slot: int) -> None:
        """Stop ``slot`` now (a cancelled request); its rows are free for the next admission."""
        self.state = self._retire(self.state, jnp.int32(slot))

    def warmup(self) -> None:
        """Compile and run every program once, so that no request waits for a compilation (a
        server calls this before it accepts connections). It runs on slot 0 and leaves it
        retired: the next admission's prefill and start overwrite all of that slot's state."""
        for size, first in sorted(self._prefill, key=lambda k: (not k[1], k[0])):  # a first chunk before the rest
            self._run_prefill(0, np.zeros((1, size), np.int32), 1, size, first)
        for sample in (False, True):
            mode = "spec" if self.width > 1 else "ar"
            self.start(0, SlotSettings(mode=mode, max_new_tokens=1, block_length=self.width, threshold=None,
                                       temperature=1.0 if sample else 0.0))
            for modes, _ in self._groups:
                self.state = self._step[modes, sample](self.model.params, self.model.lora, self.state)
        self.retire(0)
        self.snapshot()

    # ------------------------------------------------------------------ steps

    def step(self, live: dict[int, SlotSettings]) -> None:
        """One forward for every live row (``live``: slot -> its settings, from the scheduler):
        each step group with live rows runs once."""
        groups = self._groups
        if self.config.ar_steps == "auto":  # the block program alone while it has a block row to advance
            groups = groups[:1] if any(s.mode != "ar" for s in live.values()) else groups[1:]
        for modes, _ in groups:
            members = [s for s in live.values() if s.mode in modes]
            if members:
                sample = any(s.samples for s in members)
                self.state = self._step[modes, sample](self.model.params, self.model.lora, self.state)

    def snapshot(self) -> Snapshot:
        t = self.state.track
        out, n, nfe, done, bad = jax.device_get((t.out, t.n, t.nfe, t.done, t.nonfinite))
        return Snapshot(np.asarray(out), np.asarray(n), np.asarray(nfe), np.asarray(done), np.asarray(bad))


def _prefill_chunk(params, state: DecodeState, slot, tokens, n_valid, *, config, runtime, first: bool):
    """Causal forward of one prompt chunk of ``slot`` after its cached prefix; K/V into its rows."""
    cache = state.cache
    k_row = lax.dynamic_slice_in_dim(cache.k, slot, 1, axis=1)
    v_row = lax.dynamic_slice_in_dim(cache.v, slot, 1, axis=1)
    begin = jnp.where(first, 0, cache.lengths[slot])
    T = tokens.shape[1]
    # The first chunk attends within itself only (an empty cache view), as generate's prefill does.
    view = KVCache(k_row[:, :, :0], v_row[:, :, :0], jnp.zeros((1,), jnp.int32)) if first else \
        KVCache(k_row, v_row, begin[None])
    hidden, k, v = forward_hidden(params, config, tokens, view, pattern=BlockPattern.causal(1, T), uniform="causal",
                                  runtime=runtime)
    row = KVCache(k_row, v_row, begin[None]).write(k, v)
    cache = KVCache(lax.dynamic_update_slice_in_dim(cache.k, row.k, slot, axis=1),
                    lax.dynamic_update_slice_in_dim(cache.v, row.v, slot, axis=1),
                    cache.lengths.at[slot].set(begin + n_valid))
    last = lax.dynamic_slice_in_dim(hidden, n_valid - 1, 1, axis=1)  # [1, 1, D]
    return dataclasses.replace(state, cache=cache), last


def _start_slot(params, state: DecodeState, slot, last, row: Rows, *, config, spec: StepSpec):
    B = state.rows.mode.shape[0]
    rows = jax.tree.map(lambda all_rows, one: all_rows.at[slot].set(one[0]), state.rows, row)
    pick = jnp.arange(B) == slot
    hidden = jnp.zeros((B,) + last.shape[1:], last.dtype).at[slot].set(last[0])
    fresh = Track.empty(B, state.track.out.shape[1], state.track.width)
    track = jax.tree.map(lambda f, t: jnp.where(pick.reshape((B,) + (1,) * (t.ndim - 1)), f, t), fresh, state.track)
    track = start(params, config, rows, track, hidden, spec, start_rows=pick)
    return DecodeState(state.cache, rows, track)


def _retire(state: DecodeState, slot):
    return dataclasses.replace(state, track=dataclasses.replace(state.track, done=state.track.done.at[slot].set(True)))
