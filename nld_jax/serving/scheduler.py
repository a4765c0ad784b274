"""The scheduler: requests arrive and leave at any time; one thread drives the engine.

Each iteration of the loop admits queued requests into free slots (a prompt is prefilled one
chunk per iteration, so a long prompt never stalls the running rows for more than one chunk),
runs one engine dispatch per step group of the live rows (up to ``n`` decode steps on the
device, about ``EngineConfig.dispatch_seconds`` long, ended early when a row finishes), and
hands each request its new tokens. A finished row frees its slot at once; a cancelled one is
retired before the next dispatch. Requests beyond the queue's bound are refused
(:class:`QueueFull`), so memory stays bounded under any load.

A :class:`Request` is the handle a caller keeps: ``result()`` blocks for the whole output,
``events()`` iterates over the text and tokens as they come, ``on_event`` (set before
submitting) receives them on the scheduler's thread (the HTTP server forwards them to its event
loop), ``cancel()`` stops it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Iterator

from nld_jax.serving.engine import Engine, SlotSettings
from nld_jax.serving.metrics import Metrics

__all__ = ["Request", "Scheduler", "QueueFull", "ShuttingDown", "Event"]

_ids = itertools.count(1)


class QueueFull(RuntimeError):
    """The server is at capacity; retry later."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new requests."""


@dataclasses.dataclass
class Event:
    kind: str  # "tokens" (new ids and text), "done"
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""


class Request:
    """One generation: the prompt, its settings and, once running, its output."""

    def __init__(self, prompt: list[int], settings: SlotSettings, *, stop_strings: tuple[str, ...] = (),
                 on_event: Callable[[Event], None] | None = None):
        self.id = next(_ids)
        self.prompt, self.settings, self.stop_strings = list(prompt), settings, tuple(stop_strings)
        self.on_event = on_event
        self.tokens: list[int] = []
        self.text = ""
        self.nfe = 0
        self.finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
        self.error: BaseException | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()

    # -------------------------------------------------------------- caller side

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> "Request":
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The request's events as they come, ending with a ``done`` event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._events:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {self.id}: no event within {timeout} s")
                    self._cond.wait(left)
                event = self._events.popleft()
            yield event
            if event.kind == "done":
                return

    # -------------------------------------------------------------- scheduler side

    def _emit(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        self._done.set()
        self._emit(Event("done"))


@dataclasses.dataclass
class _Slot:
    request: Request
    chunks: list  # prefill chunks still to run
    whole: bool = False  # the prompt is one chunk: admitted with the others of its iteration, in one program
    sent: int = 0  # tokens of the slot's output already handed to the request


class Scheduler:
    """Drives an :class:`Engine` from a thread of its own (see the module docstring)."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, tokenizer=None, metrics: Metrics | None = None,
                 dispatch_seconds: float | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.dispatch_seconds = dispatch_seconds  # None: the engine's (EngineConfig.dispatch_seconds)
        self.metrics = metrics or Metrics()
        self.max_queue = max_queue
        self._intake: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending = 0  # submitted and not yet in a slot
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="nld-serve-scheduler", daemon=True)
        self.crashed: BaseException | None = None

    # -------------------------------------------------------------- control

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        # Checked before the request counts as pending: a refused request must not hold a queue place.
        self.engine.check_fits(len(request.prompt), request.settings.max_new_tokens, request.settings.mode,
                               request.settings.block_length)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self.crashed is not None:
                raise ShuttingDown(f"the engine stopped: {self.crashed}")
            if self._pending >= self.max_queue:
                self.metrics.rejected()
                raise QueueFull(f"{self._pending} requests are waiting (the limit is {self.max_queue})")
            self._pending += 1
        self._intake.put(request)
        self.metrics.submitted(request.settings.mode)
        self._wake.set()
        return request

    def stop(self, drain: bool = True, timeout: float = 120.0) -> None:
        """Stop taking requests; with ``drain`` finish the running and queued ones first."""
        with self._lock:
            self._accepting = False
        if not drain:
            self._stop = True
        deadline = time.monotonic() + timeout
        while drain and self.busy and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(deadline - time.monotonic(), 1.0))

    @property
    def accepting(self) -> bool:
        """False once :meth:`stop` began (draining) or the engine failed."""
        return self._accepting and self.crashed is None

    @property
    def busy(self) -> bool:
        return bool(self._slots) or self._pending > 0

    @property
    def queue_depth(self) -> int:
        return self._pending

    @property
    def slots_busy(self) -> int:
        return len(self._slots)

    # -------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            while not self._stop:
                self._take_intake()
                self._drop_cancelled()
                self._admit()
                if fresh := self._prefill_one_chunk_each():
                    # The first token of AR and spec rows comes from the prefill: it goes out now, not
                    # after the next dispatch (the snapshot waits for the prefill, which the dispatch
                    # would wait for anyway).
                    self._hand_out(fresh, self.engine.snapshot())
                live = {slot: s.request.settings for slot, s in self._slots.items() if not s.chunks}
                if live:
                    started = time.perf_counter()
                    steps = self.engine.step(live, self.dispatch_seconds)  # up to n steps per group, on the device
                    snap = self.engine.snapshot()
                    self.metrics.step(live, time.perf_counter() - started, steps)
                    self._hand_out(live, snap)
                elif not self._slots and not self._waiting:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # the engine failed: fail every request, refuse new ones
            self.crashed = e
            for s in list(self._slots.values()):
                s.request._finish("error", e)
            for r in list(self._waiting):
                r._finish("error", e)
            self._slots.clear()
            self._waiting.clear()

    def _take_intake(self) -> None:
        while True:
            try:
                self._waiting.append(self._intake.get_nowait())
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._release_pending()
            r._finish("cancelled")
            self.metrics.finished(r)
        for slot, s in list(self._slots.items()):
            if s.request.cancelled:
                self.engine.retire(slot)
                del self._slots[slot]
                s.request._finish("cancelled")
                self.metrics.finished(s.request)

    def _release_pending(self) -> None:
        with self._lock:
            self._pending -= 1

    def _admit(self) -> None:
        free = [b for b in range(self.engine.config.slots) if b not in self._slots]
        while free and self._waiting:
            request = self._waiting.popleft()
            self._release_pending()
            slot = free.pop(0)
            try:
                chunks = self.engine.prefill_chunks(slot, request.prompt)
                self.engine.row_settings(request.settings)  # validated now, not after the prefill
            except ValueError as e:
                request._finish("error", e)
                self.metrics.finished(request)
                free.insert(0, slot)
                continue
            self._slots[slot] = _Slot(request, chunks, whole=len(chunks) == 1)

    def _prefill_one_chunk_each(self) -> list[int]:
        """One prefill chunk of each slot that has some left (the prompts of one chunk all
        together, see :meth:`Engine.admit_many`); the slots whose prefill ended (and that started
        decoding)."""
        started, whole = [], []
        for slot, s in self._slots.items():
            if s.whole and s.chunks:
                whole.append(slot)
            elif s.chunks:
                s.chunks.pop(0)()
                if not s.chunks:
                    self.engine.start(slot, s.request.settings)
                    started.append(slot)
        if whole:
            self.engine.admit_many([(slot, self._slots[slot].request.prompt, self._slots[slot].request.settings)
                                    for slot in whole])
            for slot in whole:
                self._slots[slot].chunks.clear()
            started += whole
        for slot in started:
            r = self._slots[slot].request
            r.nfe = 1 if r.settings.mode != "diffusion" else 0
        return started

    def _hand_out(self, live, snap) -> None:
        """Each of the ``live`` slots' new tokens to its request; finished requests close."""
        eos = self.engine.model.config.eos_token_id
        for slot in list(live):
            s = self._slots[slot]
            r = s.request
            if snap.nonfinite[slot]:
                self._close(slot, "error", ValueError("the model produced NaN or Inf while decoding this request"))
                continue
            n = int(snap.n[slot])
            new = [int(t) for t in snap.out[slot, s.sent:n]]
            stops = {eos, *r.settings.stop_ids} - {None}
            cut = next((i for i, t in enumerate(new) if t in stops), None)
            if cut is not None:  # diffusion commits whole blocks: nothing after the stop token
                new = new[:cut + 1]
            # spec keeps its last accepted run whole, up to block_length - 1 tokens past the budget;
            # a request promises at most max_new_tokens (OpenAI's max_tokens), so the host cuts there.
            room = max(r.settings.max_new_tokens - len(r.tokens), 0)
            capped = len(new) > room
            if capped:
                new = new[:room]
                cut = None if cut is not None and cut >= room else cut
            s.sent = n
            r.nfe = int(snap.nfe[slot])
            if new and r.first_token_at is None:
                r.first_token_at = time.perf_counter()
            r.tokens += new
            text, stop_hit = self._text(r)
            finishing = stop_hit or cut is not None or capped or bool(snap.done[slot])
            shown = text if finishing else _hold_back(text, r.stop_strings)
            if new or len(shown) > len(r.text):
                r._emit(Event("tokens", new, shown[len(r.text):]))
                r.text = shown
            if stop_hit:
                self._close(slot, "stop", retire=not snap.done[slot])
            elif finishing:
                self._close(slot, "stop" if cut is not None else "length", retire=not snap.done[slot])

    def _text(self, r: Request) -> tuple[str, bool]:
        """The decoded text so far, cut at the first stop string (and whether one was hit)."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(r.tokens)
        hits = [at for at in (text.find(stop) for stop in r.stop_strings) if at >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def _close(self, slot: int, reason: str, error: BaseException | None = None, retire: bool = False) -> None:
        s = self._slots.pop(slot)
        if retire:  # finished on the host side only (a stop string): the row stops now
            self.engine.retire(slot)
        s.request._finish(reason, error)
        self.metrics.finished(s.request)


def _hold_back(text: str, stop_strings: tuple[str, ...]) -> str:
    """What can be shown of an unfinished text: not a trailing partial character (byte-level
    tokens), and not a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]
