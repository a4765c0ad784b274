"""The continuous-batching engine: a fixed number of slots over one static KV cache, rows of any
mode side by side, requests entering free slots and leaving between dispatches.

It is built from the decode loop's own pieces (:mod:`nld_jax.decode.loop`), so there is one
implementation of each algorithm: a slot is admitted by a causal prefill of its prompt (in
chunks, into its rows of the cache) and :func:`~nld_jax.decode.loop.start`; every decode step
is :func:`~nld_jax.decode.loop.step`, the very function ``generate``'s ``while_loop`` runs. A row
therefore decodes exactly what ``generate`` gives it alone: its mode, block length, threshold,
sampling settings, PRNG key and stop ids are its own (traced, so no request recompiles
anything), and the sampling noise of a row depends on its own forward count only.

Where the time goes, and what the design does about it (``benchmarks/serve_bench.py
--profile`` measures each part):

* **Groups by forward width.** AR rows step in a program of width 1, ``diffusion`` / ``spec``
  rows in one of the block width, ``spec_quadratic`` rows in one of width ``C * (C + 1)``. A row
  never pays for a wider forward than its mode's (an AR row in the block program would push a
  whole block through every matmul for one token).
* **Only the live rows, only the used cache.** A dispatch gathers the live rows of a group (a
  slot bucket: 1, 2, 3, 4, 6, 8, 12, ... up to ``slots``; the rest padded with rows that do not
  step) and the first ``span`` positions of their KV cache (``min_span`` = 128, 192, 256, 384,
  ... up to the cache), steps them, and writes them back. A program's cost follows the rows and
  context in use, not the engine's capacity (attention over an unused 1280-slot cache cost more
  than the matmuls).
* **Several steps per dispatch.** A dispatch runs up to ``n`` steps in a ``lax.while_loop`` on
  the device, as ``generate`` does, and leaves early when a row of the group finishes (its slot
  can take the next request) or a row's cache would pass the span. The host picks ``n`` so that
  a dispatch takes about ``dispatch_seconds`` (measured per program), which amortises the host's
  per-dispatch work (Python, the snapshot, token hand-off) and bounds how long a new request,
  a cancellation or a stream waits.

* **Admissions together.** Prompts of one bucket that wait in the same iteration are prefilled
  and started in one program (2, 4, 8, ... at a time); a prompt longer than ``prefill_chunk``
  is prefilled one chunk per iteration, so it never stalls the running rows for long.

Programs (each compiled once per engine; all donate the state):

* ``prefill``: one prompt chunk of one slot (chunk sizes 16, 32, ... up to ``prefill_chunk``);
* ``start``: the slot's settings and its first token (the prompt's last hidden state);
* ``admit``: the prefill and start of k slots whose prompts fit one chunk of the same size;
* ``steps``: per group, slot bucket, span and greedy / sampling variant. Compiling them all is
  many programs, so :meth:`Engine.warmup` compiles one per group that serves every case (all
  slots, the whole cache, sampling: a greedy row decides the same in it) and the others are
  compiled on a background thread: with ``programs="ahead"`` (the default) the greedy programs
  of short contexts and the common admissions at once, then any other the first time a
  dispatch would use it; with ``"lazy"`` only those first asked for. Until a program is ready
  the universal one (or the one-slot prefill and start) serves its cases. ``"eager"`` compiles
  every program in :meth:`Engine.warmup`;
* ``retire``: a cancelled slot stops at once.

Thread-safety: an :class:`Engine` is driven by one thread (the scheduler's); the background
compiler only adds compiled programs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nld_jax.attention import BlockPattern
from nld_jax.decode import MODES, DecodeState, Rows, StepSpec, Track, start, step
from nld_jax.decode.spec_quadratic import width_for as quad_width
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.model import forward_hidden
from nld_jax.runtime import Runtime
from nld_jax import validation

__all__ = ["EngineConfig", "SlotSettings", "Engine", "Snapshot", "GROUPS"]

log = logging.getLogger("nld_jax.serving")

MIN_CHUNK = 16
PROGRAM_POLICIES = ("ahead", "lazy", "eager")
DEFAULT_QUAD_BLOCK = 8  # spec_quadratic's forward is C * (C + 1) tokens a row: 72 at C = 8, 1056 at C = 32
# The step groups: the modes a program steps together (rows of one forward width).
GROUPS = {"ar": ("ar",), "block": ("diffusion", "spec"), "quad": ("spec_quadratic",)}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape of an engine: what its programs are compiled for.

    ``max_len``: the context a request may use (prompt + new tokens + the block overshoot of the
    block modes); default the model's context, at most 2048. ``max_new_tokens``: the largest
    budget a request may ask for. ``block_width``: the widest ``block_length`` of ``diffusion``
    and ``spec`` (default the checkpoint's ``block_size``). ``quad_block``: the widest
    ``block_length`` of ``spec_quadratic`` (default ``min(block_width, 8)``; 0 serves no
    ``spec_quadratic``). ``dispatch_seconds``: about how long one dispatch runs (it runs
    up to ``max_steps`` steps). ``programs``: ``"ahead"``, ``"lazy"`` or ``"eager"`` (see the
    module docstring).
    ``min_span``: the shortest cache span a program reads (then 1.5 and 2 times that, ... up to
    the cache).
    """

    slots: int = 8
    max_len: int | None = None
    max_new_tokens: int = 512
    block_width: int | None = None
    quad_block: int | None = None
    prefill_chunk: int = 256
    max_stop_ids: int = 8
    implementation: str = "auto"
    dispatch_seconds: float = 0.05
    max_steps: int = 64
    programs: str = "ahead"
    min_span: int = 128

    def __post_init__(self):
        for name in ("slots", "max_new_tokens", "prefill_chunk", "max_stop_ids", "max_steps"):
            validation.integer(getattr(self, name), name, minimum=1)
        if self.quad_block is not None:
            validation.integer(self.quad_block, "quad_block", minimum=0)
            if self.quad_block == 1:
                raise ValueError("quad_block must be 0 (no spec_quadratic) or >= 2 (a seed and a draft)")
        for name in ("prefill_chunk", "min_span"):
            value = validation.integer(getattr(self, name), name)
            if value < MIN_CHUNK or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_CHUNK}, got {value}")
        validation.number(self.dispatch_seconds, "dispatch_seconds", minimum=0.0, maximum=60.0)
        if self.programs not in PROGRAM_POLICIES:
            raise ValueError(f"programs must be one of {PROGRAM_POLICIES}, got {self.programs!r}")


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
    """What the host reads after a dispatch: per slot, tokens emitted so far and whether it is done."""

    out: np.ndarray  # [B, N]
    n: np.ndarray  # [B]
    nfe: np.ndarray  # [B]
    done: np.ndarray  # [B]
    nonfinite: np.ndarray  # [B]
    lengths: np.ndarray  # [B] cached positions


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    modes: tuple[str, ...]
    width: int  # tokens per forward of a row


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    group: str
    rows: int  # slot bucket
    span: int  # cache positions the program reads and writes
    sample: bool


@dataclasses.dataclass(frozen=True)
class AdmitKey:
    rows: int  # requests admitted together (2, 4, 8, ...)
    tokens: int  # their prompt bucket (one prefill chunk)
    sample: bool


def _chunk_sizes(limit: int) -> list[int]:
    return [1 << k for k in range(int(math.log2(MIN_CHUNK)), int(math.log2(limit)) + 1)]


def _chunk_size(n: int) -> int:
    """The prefill bucket of ``n`` prompt tokens (generate's prompt bucket: a power of two >= 16)."""
    return max(MIN_CHUNK, 1 << max(n - 1, 0).bit_length())


def _buckets(limit: int, smallest: int = 1, half_steps: bool = False) -> list[int]:
    """``smallest``, twice that, ... below ``limit``, and ``limit``; with ``half_steps`` also
    1.5 times each (1, 2, 3, 4, 6, 8, 12, 16, ...: at most a third of a bucket is padding)."""
    out, b = set(), smallest
    while b < limit:
        out.add(b)
        if half_steps and b >= 2 and b * 3 // 2 < limit:
            out.add(b * 3 // 2)
        b *= 2
    return sorted(out) + [limit]


def _struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class Engine:
    """Slots, the device state and the compiled programs (see the module docstring)."""

    def __init__(self, model: NLDModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        mc = model.config
        self.width = config.block_width or mc.block_size
        self.quad_block = min(self.width, DEFAULT_QUAD_BLOCK) if config.quad_block is None else config.quad_block
        self.max_len = min(config.max_len or min(mc.max_position_embeddings, 2048), mc.max_position_embeddings)
        if self.max_len < 2:
            raise ValueError(f"max_len {self.max_len} leaves no room for a prompt and a token")
        self.groups = [Group("ar", GROUPS["ar"], 1), Group("block", GROUPS["block"], self.width)]
        if self.quad_block:
            self.groups.append(Group("quad", GROUPS["quad"], quad_width(self.quad_block)))
        self.state_width = max(g.width for g in self.groups)
        self.capacity = config.max_new_tokens + max(self.width, self.quad_block)  # spec may overshoot by a block
        # A live row holds at most max_len positions and writes one forward (or one prefill chunk) past them.
        self.cache_size = self.max_len + max(self.state_width, config.prefill_chunk)
        self.spans = _buckets(self.cache_size, config.min_span, half_steps=True)
        self.buckets = _buckets(config.slots, half_steps=True)
        self.admit_sizes = [k for k in _buckets(config.slots) if k >= 2 and k & (k - 1) == 0]  # 2, 4, 8, ...
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
            Track.empty(B, self.capacity, self.state_width))
        # Every leaf its own buffer: the programs donate the state, and a buffer shared by two
        # leaves (Track.empty reuses its zeros) cannot be donated twice.
        self.state = jax.tree.map(lambda x: jnp.array(x, copy=True), self.state)
        self._lengths = np.zeros((B,), np.int64)  # each slot's cached positions, as the host last saw them
        self._pending_work = False  # prefills or starts dispatched since the last step dispatch
        # What the step programs are compiled for (read once: the state's buffers are donated at every dispatch).
        self._shapes = tuple(jax.tree.map(_struct, x) for x in (model.params, model.lora, self.state))
        self._compile()

    # ------------------------------------------------------------------ programs

    def _spec(self, modes, width, sample: bool) -> StepSpec:
        return StepSpec(modes=tuple(modes), width=width, sample=sample, truncate=sample,
                        lora=self.has_lora and modes != ("ar",),
                        confidence=any(m in modes for m in ("diffusion", "spec")), runtime=self.runtime)

    def _compile(self) -> None:
        config, runtime = self.model.config, self.runtime
        self._prefill = {}
        for size in _chunk_sizes(self.config.prefill_chunk):
            for first in (True, False):
                self._prefill[size, first] = jax.jit(
                    functools.partial(_prefill_chunk, config=config, runtime=runtime, first=first),
                    donate_argnums=(1,))
        self._start = {sample: jax.jit(functools.partial(_start_slot, config=config,
                                                         spec=self._spec(MODES, self.state_width, sample)),
                                       donate_argnums=(1,))
                       for sample in (False, True)}
        self._retire = jax.jit(_retire, donate_argnums=(0,))
        self._group = {g.name: g for g in self.groups}
        self._programs: dict[ProgramKey | AdmitKey, object] = {}  # compiled step and admission programs
        self._seconds: dict[ProgramKey, float] = {}  # measured seconds per step of each program
        self.compilations = 0  # step programs compiled (tests and benchmarks read it)
        self.dispatches = 0
        self.steps_run = 0
        self.dispatched: collections.Counter = collections.Counter()  # runs per step / admission program
        self._lock = threading.Lock()
        self._wanted: queue.PriorityQueue = queue.PriorityQueue()  # (priority, order, key)
        self._order = itertools.count()
        self._queued: dict[ProgramKey | AdmitKey, int] = {}  # queued for the compiler, with its priority
        self._compiler: threading.Thread | None = None

    def program_keys(self) -> list[ProgramKey | AdmitKey]:
        """Every step and admission program this engine may run."""
        return [ProgramKey(g.name, b, span, sample) for g in self.groups for sample in (False, True)
                for b in self.buckets for span in self.spans] + \
            [AdmitKey(k, size, sample) for sample in (False, True) for k in self.admit_sizes
             for size in _chunk_sizes(self.config.prefill_chunk)]

    def _universal(self, group: str) -> ProgramKey:
        return ProgramKey(group, self.config.slots, self.cache_size, True)

    def _build(self, key):
        """Compile the step program ``key`` (a :class:`ProgramKey`) or the admission program ``key``
        (an :class:`AdmitKey`), ahead of time from shapes (the state may be donated meanwhile)."""
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        if isinstance(key, AdmitKey):
            fn = functools.partial(_admit_rows, config=self.model.config, runtime=self.runtime,
                                   spec=self._spec(MODES, self.state_width, key.sample))
            params, _, state = self._shapes
            rows = jax.tree.map(lambda x: jax.ShapeDtypeStruct((key.rows,) + x.shape[1:], x.dtype), state.rows)
            args = (params, state, i32(key.rows), i32(key.rows, key.tokens), i32(key.rows), rows)
            compiled = jax.jit(fn, donate_argnums=(1,)).lower(*args).compile()
        else:
            g = self._group[key.group]
            fn = functools.partial(_group_steps, config=self.model.config,
                                   spec=self._spec(g.modes, g.width, key.sample), span=key.span)
            compiled = jax.jit(fn, donate_argnums=(2,)).lower(*self._shapes, i32(key.rows), i32()).compile()
        with self._lock:
            self._programs[key] = compiled
            self.compilations += 1
        return compiled

    def _compile_in_background(self, key: ProgramKey | AdmitKey, priority: int = 0) -> None:
        """Queue ``key`` for the compiler thread (``priority`` 0: a dispatch wants it now; 1: ahead
        of need)."""
        with self._lock:
            if key in self._programs or self._queued.get(key, 2) <= priority:
                return
            self._queued[key] = priority  # queued again if it waited with a lower priority
            if self._compiler is None:
                self._compiler = threading.Thread(target=self._compile_loop, name="nld-serve-compiler", daemon=True)
                self._compiler.start()
        self._wanted.put((priority, next(self._order), key))

    def _compile_loop(self) -> None:
        while True:
            _, _, key = self._wanted.get()
            if key is None:
                return
            try:
                if key not in self._programs:
                    self._build(key)
            except Exception:  # the universal program keeps serving this case
                log.exception("compiling the program %s failed", key)
            finally:
                with self._lock:
                    self._queued.pop(key, None)

    @property
    def programs_pending(self) -> int:
        """Programs queued for the background compiler."""
        with self._lock:
            return len(self._queued)

    def close(self) -> None:
        """Stop the background compiler (a program it is compiling finishes first)."""
        compiler, self._compiler = self._compiler, None
        if compiler is not None:
            self._wanted.put((-1, -1, None))
            compiler.join(timeout=120)

    def _program_for(self, want: ProgramKey):
        """The compiled program for ``want``, or the cheapest compiled one that serves it (more
        rows, a longer span, sampling); compiled now if there is none."""
        with self._lock:
            exact = self._programs.get(want)
            if exact is not None:
                return want, exact
            serving = [(k, p) for k, p in self._programs.items()
                       if isinstance(k, ProgramKey) and k.group == want.group and k.rows >= want.rows
                       and k.span >= want.span and k.sample >= want.sample]
        if not serving:
            return want, self._build(want)
        self._compile_in_background(want)
        return min(serving, key=lambda kp: kp[0].rows * (kp[0].span + 4 * self._group[want.group].width))

    # ------------------------------------------------------------------ slots

    def admit(self, slot: int, prompt: list[int], settings: SlotSettings) -> None:
        """Prefill ``prompt`` into ``slot`` (chunk by chunk) and start decoding it."""
        for chunk in self.prefill_chunks(slot, prompt):
            chunk()
        self.start(slot, settings)

    def admit_many(self, entries: list[tuple[int, list[int], SlotSettings]]) -> None:
        """Admit several requests ``(slot, prompt, settings)`` whose prompts fit one prefill
        chunk: those of one prompt bucket (and greedy or not) are prefilled and started together,
        2, 4, 8, ... at a time, in one program each; what no compiled program takes goes
        through :meth:`admit` (and the program it wanted is compiled in the background)."""
        groups: dict[tuple[int, bool], list] = collections.defaultdict(list)
        for slot, prompt, settings in entries:
            if len(prompt) > self.config.prefill_chunk:
                raise ValueError(f"a prompt of {len(prompt)} tokens is more than one prefill chunk")
            groups[_chunk_size(len(prompt)), settings.samples].append((slot, prompt, settings))
        for (size, sample), items in groups.items():
            while items:
                sizes = [k for k in self.admit_sizes if k <= len(items)]
                with self._lock:
                    ready = [k for k in sizes if AdmitKey(k, size, sample) in self._programs]
                if sizes and (not ready or ready[-1] < sizes[-1]):
                    self._compile_in_background(AdmitKey(sizes[-1], size, sample))
                if not ready:
                    self.admit(*items.pop(0))
                    continue
                k = ready[-1]
                piece, items = items[:k], items[k:]
                tokens = np.zeros((k, size), np.int32)
                for i, (_, prompt, _) in enumerate(piece):
                    tokens[i, :len(prompt)] = prompt
                rows = jax.tree.map(lambda *xs: np.concatenate(xs), *[self.row_settings(s) for _, _, s in piece])
                self.state = self._programs[AdmitKey(k, size, sample)](
                    self.model.params, self.state, np.asarray([slot for slot, _, _ in piece], np.int32), tokens,
                    np.asarray([len(p) for _, p, _ in piece], np.int32), rows)
                for slot, prompt, _ in piece:
                    self._lengths[slot] = len(prompt)
                self._pending_work = True
                self.dispatched[AdmitKey(k, size, sample)] += 1

    def prefill_chunks(self, slot: int, prompt: list[int]):
        """The prefill of ``slot`` as a list of callables, one per chunk, so that a scheduler can
        interleave them with decode steps of the running rows."""
        self.check_fits(len(prompt), 0, "ar", 1)
        limit = self.config.prefill_chunk
        chunks = []
        for begin in range(0, len(prompt), limit):
            part = prompt[begin:begin + limit]
            size = _chunk_size(len(part))
            tokens = np.zeros((1, size), np.int32)
            tokens[0, :len(part)] = part
            chunks.append(functools.partial(self._run_prefill, slot, tokens, len(part), size, begin == 0))
        return chunks

    def _run_prefill(self, slot, tokens, n_valid, size, first) -> None:
        # numpy arguments: a jitted call takes them on its fast path (a jnp array here is an eager op each)
        self.state, self._last = self._prefill[size, first](self.model.params, self.state, np.int32(slot), tokens,
                                                            np.int32(n_valid))
        self._lengths[slot] = n_valid if first else self._lengths[slot] + n_valid
        self._pending_work = True

    def start(self, slot: int, settings: SlotSettings) -> None:
        """After the prefill: the slot's settings, its first token, its mode's start."""
        row = self.row_settings(settings)
        self.state = self._start[settings.samples](self.model.params, self.state, np.int32(slot), self._last, row)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this engine serves."""
        return tuple(m for m in MODES if any(m in g.modes for g in self.groups))

    def block_limit(self, mode: str) -> int:
        """The widest ``block_length`` this engine serves in ``mode``."""
        return self.quad_block if mode == "spec_quadratic" else self.width

    def row_settings(self, s: SlotSettings) -> Rows:
        if s.mode == "spec_quadratic" and not self.quad_block:
            raise ValueError("this engine serves no spec_quadratic (quad_block=0)")
        if s.block_length > self.block_limit(s.mode):
            raise ValueError(f"block_length {s.block_length} exceeds this engine's {s.mode} block width "
                             f"{self.block_limit(s.mode)}")
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
        one = lambda value, dtype: np.asarray([value], dtype)  # noqa: E731
        return Rows(mode=one(MODES.index(s.mode), np.int32), block_length=one(s.block_length, np.int32),
                    max_new_tokens=one(s.max_new_tokens, np.int32), temperature=one(s.temperature, np.float32),
                    threshold=one(0.0 if s.threshold is None else s.threshold, np.float32),
                    use_threshold=one(s.use_threshold, bool), top_p=one(s.top_p, np.float32),
                    top_k=one(s.top_k, np.int32), use_lora=one(s.use_lora and s.mode != "ar", bool),
                    key=np.asarray(validation.seed_key(s.seed)[None], np.uint32),
                    stop_ids=np.asarray([stops], np.int32))

    def check_fits(self, prompt_len: int, max_new_tokens: int, mode: str, block_length: int) -> None:
        from nld_jax.decode import context_needed

        needed = context_needed(prompt_len, max_new_tokens, mode, block_length)
        if needed > self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens}"
                             + (f" + {needed - prompt_len - max_new_tokens} (block overshoot)" if mode != "ar" else "")
                             + f" exceeds the server's context of {self.max_len} positions")

    def retire(self, slot: int) -> None:
        """Stop ``slot`` now (a cancelled request); its rows are free for the next admission."""
        self.state = self._retire(self.state, np.int32(slot))

    def warmup(self) -> None:
        """Compile the programs (see ``programs`` in the module docstring) and run the prefill
        and start programs once, so that no request waits for a compilation (a server calls this
        before it accepts connections). It runs on slot 0 and leaves it retired: the next
        admission's prefill and start overwrite all of that slot's state."""
        for size, first in sorted(self._prefill, key=lambda k: (not k[1], k[0])):  # a first chunk before the rest
            self._run_prefill(0, np.zeros((1, size), np.int32), 1, size, first)
        for sample in (False, True):
            mode = "spec" if self.width > 1 else "ar"
            self.start(0, SlotSettings(mode=mode, max_new_tokens=1, block_length=self.width, threshold=None,
                                       temperature=1.0 if sample else 0.0))
        self.retire(0)
        universal = [self._universal(g.name) for g in self.groups]
        for key in self.program_keys() if self.config.programs == "eager" else universal:
            if key not in self._programs:
                self._build(key)
        if self.config.programs == "ahead":  # the greedy programs of short contexts, compiled while serving
            for key in self.ahead_keys():
                self._compile_in_background(key, priority=1)
        self.snapshot()

    def ahead_keys(self) -> list[ProgramKey]:
        """What the background compiler compiles after :meth:`warmup` without waiting to be asked:
        greedy AR and block programs of every slot bucket for the two shortest spans (an AR or
        block row never needs more than ``max_len`` positions: the context check counts the block
        overshoot), and greedy admissions of the three shortest prompt buckets; the rest
        (spec_quadratic's among them) when first asked for."""
        spans = [s for s in self.spans if s <= self._span_for(self.max_len)][:2]
        steps = [ProgramKey(g.name, b, span, False) for span in spans for g in self.groups
                 if g.name != "quad" for b in reversed(self.buckets)]
        admits = [AdmitKey(k, size, False) for size in _chunk_sizes(self.config.prefill_chunk)[:3]
                  for k in reversed(self.admit_sizes)]
        return steps + admits

    # ------------------------------------------------------------------ steps

    def step(self, live: dict[int, SlotSettings], dispatch_seconds: float | None = None) -> int:
        """Decode the live rows (``live``: slot -> its settings, from the scheduler): one dispatch
        per group with live rows, each up to about ``dispatch_seconds`` long (default the
        config's; 0: one step), see the module docstring. Returns the most steps a group ran."""
        target = self.config.dispatch_seconds if dispatch_seconds is None else dispatch_seconds
        most = 0
        for g in self.groups:
            slots = [slot for slot, s in live.items() if s.mode in g.modes]
            if slots:
                most = max(most, self._dispatch(g, slots, any(live[slot].samples for slot in slots), target))
        return most

    def _dispatch(self, g: Group, slots: list[int], sample: bool, target: float) -> int:
        rows = next(b for b in self.buckets if b >= len(slots))
        longest = int(max(self._lengths[slot] for slot in slots))
        # The shortest span with room for the next step: the loop leaves once a row outgrows it, and
        # the next dispatch takes a longer one (one more dispatch at each crossing is cheaper than
        # attending over a longer span all along).
        key, program = self._program_for(ProgramKey(g.name, rows, self._span_for(longest + g.width), sample))
        n = self._steps_for(self._guess(key), target)
        others = [slot for slot in range(self.config.slots) if slot not in set(slots)]
        idx = np.asarray(slots + others[:key.rows - len(slots)], np.int32)
        if self._pending_work:  # prefills and starts queued before: not this program's time
            jax.block_until_ready(self.state)
            self._pending_work = False
        started = time.perf_counter()
        self.state, ran = program(self.model.params, self.model.lora, self.state, idx, np.int32(n))
        ran = int(ran)  # waits for the dispatch
        seconds = (time.perf_counter() - started) / max(ran, 1)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else 0.7 * old + 0.3 * seconds
        self.dispatches += 1
        self.steps_run += ran
        self.dispatched[key] += 1
        return ran

    def _guess(self, key: ProgramKey) -> float | None:
        """Seconds per step of ``key``: measured, else the nearest measured program of its group
        at least as big (an over-estimate: fewer steps), else None."""
        if key in self._seconds:
            return self._seconds[key]
        bigger = [(k.rows * k.span, s) for k, s in self._seconds.items()
                  if k.group == key.group and k.rows >= key.rows and k.span >= key.span]
        return min(bigger)[1] if bigger else None

    def _span_for(self, positions: int) -> int:
        return next((s for s in self.spans if s >= positions), self.cache_size)

    def _steps_for(self, seconds_per_step: float | None, target: float) -> int:
        if seconds_per_step is None:
            return 1
        return int(min(max(target / max(seconds_per_step, 1e-6), 1), self.config.max_steps))

    def snapshot(self) -> Snapshot:
        t = self.state.track
        out, n, nfe, done, bad, lengths = jax.device_get((t.out, t.n, t.nfe, t.done, t.nonfinite,
                                                          self.state.cache.lengths))
        self._lengths = np.array(lengths, np.int64)
        return Snapshot(np.asarray(out), np.asarray(n), np.asarray(nfe), np.asarray(done), np.asarray(bad),
                        self._lengths.copy())


def _group_steps(params, lora, state: DecodeState, idx, n_steps, *, config, spec: StepSpec, span: int):
    """Up to ``n_steps`` steps of the rows ``idx [b]`` (their first ``span`` cache positions, their
    block narrowed to the program's width), then written back. Rows of other groups among them
    (padding) do not step. Leaves early once a row of the group finishes or could write past the
    span. Returns the state and the steps run."""
    W = spec.width
    sub = _gather(state, idx, span, W)
    modes = jnp.asarray([MODES.index(m) for m in spec.modes], jnp.int32)
    in_group = jnp.isin(sub.rows.mode, modes)
    running = in_group & ~sub.track.done

    def cond(carry):
        s, i = carry
        live = in_group & ~s.track.done
        fits = jnp.all(~live | (s.cache.lengths + W <= span))
        return (i < n_steps) & jnp.any(live) & fits & ~jnp.any(running & s.track.done)

    def body(carry):
        s, i = carry
        return step(params, lora, s, config=config, spec=spec), i + 1

    sub, ran = lax.while_loop(cond, body, (sub, jnp.int32(0)))
    return _scatter(state, idx, sub, span, W), ran


def _cache_leaves(cache: KVCache) -> list[str]:
    return [name for name in ("k", "v", "k_scale", "v_scale") if getattr(cache, name) is not None]


def _gather(state: DecodeState, idx, span: int, W: int) -> DecodeState:
    take = lambda x: jnp.take(x, idx, axis=0)  # noqa: E731
    cache = state.cache
    parts = {name: jnp.take(getattr(cache, name)[:, :, :span], idx, axis=1) for name in _cache_leaves(cache)}
    sub_cache = dataclasses.replace(cache, lengths=take(cache.lengths), **parts)
    track = jax.tree.map(take, state.track)
    track = dataclasses.replace(track, blk=track.blk[:, :W], blk_at=track.blk_at[:, :W])
    return DecodeState(sub_cache, jax.tree.map(take, state.rows), track)


def _scatter(state: DecodeState, idx, sub: DecodeState, span: int, W: int) -> DecodeState:
    """``sub`` written back into the rows ``idx`` of ``state``: the cache one row at a time (each
    an in-place update of the donated buffer; XLA's scatter on CPU is slow), the track by index."""
    cache = state.cache
    names = _cache_leaves(cache)

    def row(i, arrays):  # [:, idx[i], :span] of the full cache
        out = []
        for full, name in zip(arrays, names):
            part = lax.dynamic_slice_in_dim(getattr(sub.cache, name), i, 1, axis=1)
            start = (0, idx[i]) + (0,) * (full.ndim - 2)
            out.append(lax.dynamic_update_slice(full, part, start))
        return tuple(out)

    arrays = lax.fori_loop(0, idx.shape[0], row, tuple(getattr(cache, n) for n in names))
    new_cache = dataclasses.replace(cache, lengths=cache.lengths.at[idx].set(sub.cache.lengths),
                                    **dict(zip(names, arrays)))
    full = state.track
    track = dataclasses.replace(sub.track, blk=full.blk[idx].at[:, :W].set(sub.track.blk),
                                blk_at=full.blk_at[idx].at[:, :W].set(sub.track.blk_at))
    track = jax.tree.map(lambda whole, part: whole.at[idx].set(part), full, track)
    return DecodeState(new_cache, state.rows, track)  # a row's settings never change while it decodes


def _prefill_chunk(params, state: DecodeState, slot, tokens, n_valid, *, config, runtime, first: bool):
    """Causal forward of one prompt chunk of ``slot`` after its cached prefix; K/V into its rows."""
    cache = state.cache
    T = tokens.shape[1]
    if first:
        # The first chunk attends within itself only (an empty cache view), as generate's prefill
        # does, and its K/V go straight to the slot's first T positions (no copy of the row).
        view = KVCache(cache.k[:, :1, :0], cache.v[:, :1, :0], jnp.zeros((1,), jnp.int32))
        hidden, k, v = forward_hidden(params, config, tokens, view, pattern=BlockPattern.causal(1, T),
                                      uniform="causal", runtime=runtime)
        at = (0, slot) + (0,) * (cache.k.ndim - 2)
        cache = KVCache(lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
                        lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at),
                        cache.lengths.at[slot].set(n_valid))
    else:
        k_row = lax.dynamic_slice_in_dim(cache.k, slot, 1, axis=1)
        v_row = lax.dynamic_slice_in_dim(cache.v, slot, 1, axis=1)
        begin = cache.lengths[slot]
        hidden, k, v = forward_hidden(params, config, tokens, KVCache(k_row, v_row, begin[None]),
                                      pattern=BlockPattern.causal(1, T), uniform="causal", runtime=runtime)
        row = KVCache(k_row, v_row, begin[None]).write(k, v)
        cache = KVCache(lax.dynamic_update_slice_in_dim(cache.k, row.k, slot, axis=1),
                        lax.dynamic_update_slice_in_dim(cache.v, row.v, slot, axis=1),
                        cache.lengths.at[slot].set(begin + n_valid))
    last = lax.dynamic_slice_in_dim(hidden, n_valid - 1, 1, axis=1)  # [1, 1, D]
    return dataclasses.replace(state, cache=cache), last


def _admit_rows(params, state: DecodeState, slots, tokens, n_valid, rows: Rows, *, config, runtime,
                spec: StepSpec):
    """The prefill of ``tokens [k, T]`` (one chunk each, as generate's prefill: an empty cache view)
    into the ``slots [k]``, and their start (settings, first token), in one program."""
    k, T = tokens.shape
    cache = state.cache
    view = KVCache(cache.k[:, :k, :0], cache.v[:, :k, :0], jnp.zeros((k,), jnp.int32))
    hidden, k_new, v_new = forward_hidden(params, config, tokens, view, pattern=BlockPattern.causal(k, T),
                                          uniform="causal", runtime=runtime)

    def write(i, kv):  # row i's K/V into the first T positions of its slot, in place
        at = (0, slots[i]) + (0,) * (cache.k.ndim - 2)
        return tuple(lax.dynamic_update_slice(full, lax.dynamic_slice_in_dim(new, i, 1, axis=1).astype(full.dtype), at)
                     for full, new in zip(kv, (k_new, v_new)))

    ck, cv = lax.fori_loop(0, k, write, (cache.k, cache.v))
    cache = KVCache(ck, cv, cache.lengths.at[slots].set(n_valid))
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)  # [k, 1, D]
    B = state.rows.mode.shape[0]
    all_rows = jax.tree.map(lambda full, part: full.at[slots].set(part), state.rows, rows)
    pick = jnp.zeros((B,), bool).at[slots].set(True)
    hidden_all = jnp.zeros((B,) + last.shape[1:], last.dtype).at[slots].set(last)
    fresh = Track.empty(B, state.track.out.shape[1], state.track.width)
    track = jax.tree.map(lambda f, t: jnp.where(pick.reshape((B,) + (1,) * (t.ndim - 1)), f, t), fresh, state.track)
    track = start(params, config, all_rows, track, hidden_all, spec, start_rows=pick)
    return DecodeState(cache, all_rows, track)


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
