"""Streaming tokens out of the compiled decode loops.

The loops run entirely inside ``lax.while_loop``; when ``DecodeOptions.stream`` is set, each
iteration sends its output buffer and per-row counts to the host with an ordered
``io_callback``. The host side forwards newly produced tokens to the listener installed by
:func:`streaming` (one listener at a time, for the calling thread's generation).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
from jax.experimental import io_callback

__all__ = ["emit", "streaming", "TokenStream"]

_listener: "TokenStream | None" = None


class TokenStream:
    """Turns (buffer, counts) snapshots into per-row ``on_tokens(row, new_ids)`` calls."""

    def __init__(self, on_tokens: Callable[[int, list[int]], None], eos_id: int | None = None):
        self.on_tokens = on_tokens
        self.eos_id = eos_id
        self.sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def __call__(self, out: np.ndarray, n: np.ndarray) -> None:
        for row in range(out.shape[0]):
            if row in self.finished:
                continue
            start, stop = self.sent.get(row, 0), int(n[row])
            if stop <= start:
                continue
            new = [int(t) for t in out[row, start:stop]]
            if self.eos_id is not None and self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
                self.finished.add(row)
            self.sent[row] = stop
            self.on_tokens(row, new)


def _host_emit(out, n):
    if _listener is not None:
        _listener(np.asarray(out), np.asarray(n))


def emit(enabled: bool, out, n) -> None:
    """Inside a decode loop: hand the tokens produced so far to the host (no-op unless enabled)."""
    if enabled:
        io_callback(_host_emit, None, out, n, ordered=True)


@contextlib.contextmanager
def streaming(listener: "TokenStream | Callable | None"):
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous
