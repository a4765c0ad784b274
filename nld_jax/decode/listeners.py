"""Tokens out of the compiled decode loop to host listeners, one listener per generation.

With ``DecodeOptions.stream`` the loop sends, after every step, its output buffer and per-row
counts to the host with an ordered ``io_callback``, tagged with the generation's ``stream_id``
(a traced input: one compiled program serves every listener). The host looks the listener up
by that id, so concurrent generations in other threads never see each other's tokens. A
listener that raises stops its generation: the callback answers "cancel", the loop ends, and
the exception is re-raised to the caller of :func:`listening`'s block.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

__all__ = ["TokenStream", "listening", "emit"]

_lock = threading.Lock()
_listeners: dict[int, "TokenStream"] = {}
_ids = itertools.count(1)


class TokenStream:
    """Turns (buffer, counts) snapshots into per-row ``on_tokens(row, new_ids)`` calls, each
    row's tokens cut after its first stop id."""

    def __init__(self, on_tokens: Callable[[int, list[int]], None], stop_ids=()):
        self.on_tokens = on_tokens
        self.stop_ids = {int(s) for s in stop_ids if s is not None and s >= 0}
        self.sent: dict[int, int] = {}
        self.finished: set[int] = set()
        self.error: BaseException | None = None

    def __call__(self, out: np.ndarray, n: np.ndarray) -> None:
        for row in range(out.shape[0]):
            if row in self.finished:
                continue
            start, stop = self.sent.get(row, 0), int(n[row])
            if stop <= start:
                continue
            new = [int(t) for t in out[row, start:stop]]
            cut = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
            if cut is not None:
                new = new[: cut + 1]
                self.finished.add(row)
            self.sent[row] = stop
            self.on_tokens(row, new)


def _host_emit(stream_id, out, n) -> np.ndarray:
    with _lock:
        listener = _listeners.get(int(stream_id))
    if listener is None or listener.error is not None:
        return np.asarray(listener is not None)
    try:
        listener(np.asarray(out), np.asarray(n))
    except BaseException as e:  # re-raised by listening() on the caller's thread
        listener.error = e
        return np.asarray(True)
    return np.asarray(False)


def emit(stream_id: jax.Array, out: jax.Array, n: jax.Array) -> jax.Array:
    """Inside a decode loop: hand the tokens produced so far to the host; True = cancel."""
    return io_callback(_host_emit, jax.ShapeDtypeStruct((), jnp.bool_), stream_id, out, n, ordered=True)


@contextlib.contextmanager
def listening(listener: TokenStream | None) -> Iterator[int]:
    """Register ``listener`` for one generation; yields its ``stream_id`` (0 when None)."""
    if listener is None:
        yield 0
        return
    with _lock:
        stream_id = next(_ids) % (2**31 - 1)
        _listeners[stream_id] = listener
    try:
        yield stream_id
    finally:
        with _lock:
            _listeners.pop(stream_id, None)
    if listener.error is not None:
        raise listener.error
