"""Prometheus metrics of a server (``GET /metrics``), with ``prometheus_client``.

Requests by mode and outcome, queue depth, slot occupancy, tokens and forwards by mode (their
ratio is each mode's TPF), recent output tokens per second, step and time-to-first-token
latencies. Each server has a registry of its own, so tests can run several in one process.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

__all__ = ["Metrics"]

MODES = ("ar", "diffusion", "spec", "spec_quadratic")

disable_created_metrics()  # no *_created series: they double the output and nobody reads them


class Metrics:
    def __init__(self, window_seconds: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nld_requests", "Finished requests", ["mode", "status"], registry=r)
        self.submitted_total = Counter("nld_requests_submitted", "Accepted requests", ["mode"], registry=r)
        self.rejected_total = Counter("nld_requests_rejected", "Requests refused because the queue was full",
                                      registry=r)
        self.queue_depth = Gauge("nld_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("nld_slots_busy", "Slots holding a request", registry=r)
        self.slots_total = Gauge("nld_slots", "Slots of the engine", registry=r)
        self.tokens = Counter("nld_generated_tokens", "Generated tokens", ["mode"], registry=r)
        self.forwards = Counter("nld_forwards", "Forwards counted as NVIDIA's reference counts them", ["mode"],
                                registry=r)
        self.tpf = Gauge("nld_tokens_per_forward", "Generated tokens / forwards of finished requests", ["mode"],
                         registry=r)
        self.tokens_per_second = Gauge("nld_output_tokens_per_second",
                                       f"Output tokens per second over the last {window_seconds:g} s", registry=r)
        self.step_seconds = Histogram("nld_step_seconds", "Duration of one engine iteration (a dispatch of up to n "
                                      "decode steps per step group, and the host's token hand-off)", registry=r,
                                      buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0))
        self.decode_steps = Counter("nld_decode_steps", "Decode steps run (one forward of every live row of a group; "
                                    "counted once per iteration, the most of its groups)", registry=r)
        self.programs_compiled = Gauge("nld_programs_compiled", "Engine step programs compiled so far", registry=r)
        self.programs_pending = Gauge("nld_programs_pending", "Engine step programs waiting for the background "
                                      "compiler (a universal program serves their cases meanwhile)", registry=r)
        self.ttft = Histogram("nld_time_to_first_token_seconds", "Time from arrival to the first token", registry=r,
                              buckets=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0))
        self._window = window_seconds
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._per_mode = {m: [0, 0] for m in MODES}  # finished requests: tokens, forwards
        self._lock = threading.Lock()

    def submitted(self, mode: str) -> None:
        self.submitted_total.labels(mode).inc()

    def rejected(self) -> None:
        self.rejected_total.inc()

    def step(self, live, seconds: float, steps: int = 1) -> None:
        self.step_seconds.observe(seconds)
        self.decode_steps.inc(steps)

    def finished(self, request) -> None:
        mode = request.settings.mode
        self.requests.labels(mode, request.finish_reason or "unknown").inc()
        n = len(request.tokens)
        self.tokens.labels(mode).inc(n)
        self.forwards.labels(mode).inc(request.nfe)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.created)
        with self._lock:
            totals = self._per_mode[mode]
            totals[0] += n
            totals[1] += request.nfe
            if totals[1]:
                self.tpf.labels(mode).set(totals[0] / totals[1])
            self._recent.append((time.monotonic(), n))

    def render(self, queue_depth: int, slots_busy: int, slots: int, programs: tuple[int, int] = (0, 0)) -> bytes:
        """The Prometheus text exposition (gauges of the moment set first; ``programs``: step
        programs compiled and pending)."""
        self.programs_compiled.set(programs[0])
        self.programs_pending.set(programs[1])
        self.queue_depth.set(queue_depth)
        self.slots_busy.set(slots_busy)
        self.slots_total.set(slots)
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > self._window:
                self._recent.popleft()
            self.tokens_per_second.set(sum(n for _, n in self._recent) / self._window)
        return generate_latest(self.registry)
