"""Writing safetensors shards one tensor at a time, and the shard plan with its index.

``nld_jax.checkpoint.write_safetensors`` takes a whole file's tensors at once, which for a
5 GB shard means 5 GB in memory. The format only needs every tensor's dtype and shape up
front (for the header offsets), so here the header is written first and the data follows
tensor by tensor (or strip by strip), each checked against the header it was announced in.
The file writes run on a background thread so that the next strip is gathered meanwhile.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable

import numpy as np

from nld_jax.checkpoint.hf import CheckpointError
from nld_jax.checkpoint.hf_write import shard_plan
from nld_jax.checkpoint.safetensors_io import SafetensorsError, encode_header

__all__ = ["SafetensorsStreamWriter", "BufferPool", "plan_shards"]

class BufferPool:
    """A few reusable byte buffers: a strip is gathered into one while another is being written.

    Reuse matters beyond allocation cost: fresh memory pays a page fault per page on first
    touch, which on virtual machines can be slower than the copy that fills it.
    """

    def __init__(self, size: int = 3):
        self._free: queue.Queue = queue.Queue()
        for _ in range(size):
            self._free.put(np.empty(0, np.uint8))

    def get(self, nbytes: int) -> np.ndarray:
        buf = self._free.get()  # blocks until a written buffer comes back
        if buf.nbytes < nbytes:
            buf = np.empty(0, np.uint8)  # drop the small one before allocating
            buf = np.empty(nbytes, np.uint8)
        return buf

    def put(self, buf: np.ndarray) -> None:
        self._free.put(buf)


class _BackgroundAppender:
    """Appends byte buffers to a file, in order, on a thread of its own."""

    def __init__(self, file, depth: int = 2):
        self._file = file
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nld-convert-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            data, release, done = item
            try:
                if self._error is None:
                    self._file.write(data)
            except BaseException as e:  # re-raised on the caller's thread
                self._error = e
            finally:
                if release is not None:
                    release()
                if done is not None:
                    done.set()

    def append(self, data: np.ndarray, release: Callable[[], None] | None = None, wait: bool = False) -> None:
        self._check()
        done = threading.Event() if wait else None
        self._queue.put((data.reshape(-1).view(np.uint8), release, done))
        if done is not None:
            done.wait()
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()


class SafetensorsStreamWriter:
    """One ``.safetensors`` file: the header now, tensor data as it comes, in header order."""

    def __init__(self, path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        try:
            prefix, sizes = encode_header(entries, metadata)
        except SafetensorsError as e:
            raise CheckpointError(f"{e} to safetensors") from None
        self._entries = [(name, np.dtype(dtype), tuple(shape), nbytes)
                         for (name, dtype, shape), nbytes in zip(entries, sizes)]
        self.path = path
        self.data_bytes = sum(sizes)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(prefix)
        self._appender = _BackgroundAppender(self._file)

    def _announced(self, name: str, dtype: np.dtype | None = None, shape=None) -> int:
        if self._next >= len(self._entries):
            raise CheckpointError(f"{self.path}: tensor {name!r} was not announced in the header")
        want_name, want_dtype, want_shape, nbytes = self._entries[self._next]
        if name != want_name or (dtype is not None and (dtype != want_dtype or tuple(shape) != want_shape)):
            got = f"{name!r}" + (f" {dtype}{list(shape)}" if dtype is not None else "")
            raise CheckpointError(f"{self.path}: got {got}, header expects {want_name!r} {want_dtype}"
                                  f"{list(want_shape)} next")
        return nbytes

    def write(self, name: str, array: np.ndarray) -> None:
        """A whole tensor; the array may be reused once this returns."""
        self._announced(name, array.dtype, array.shape)
        self._appender.append(np.ascontiguousarray(array), wait=True)
        self._next += 1

    def write_parts(self, name: str, parts: Iterable[tuple[np.ndarray, Callable[[], None] | None]],
                    on_bytes: Callable[[int], None] | None = None) -> None:
        """A tensor from consecutive contiguous byte pieces ``(uint8 array, release)``; each piece
        is written in the background and then ``release()``-d. The total must match the header."""
        nbytes = self._announced(name)
        written = 0
        for data, release in parts:
            written += data.nbytes
            if written > nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} is longer than its {nbytes} bytes")
            self._appender.append(data, release)
            if on_bytes is not None:
                on_bytes(data.nbytes)
        if written != nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} got {written} of its {nbytes} bytes")
        self._next += 1

    def close(self) -> None:
        self._appender.stop()
        self._file.close()
        if self._next != len(self._entries):
            missing = [e[0] for e in self._entries[self._next:]]
            raise CheckpointError(f"{self.path}: tensor(s) {missing[:5]} announced but never written")

    def abort(self) -> None:
        try:
            self._appender.stop()
        except BaseException:
            pass
        self._file.close()


def _safe_file_name(name) -> bool:
    return (isinstance(name, str) and name.endswith(".safetensors") and os.path.basename(name) == name
            and not name.startswith("."))


def plan_shards(sizes: dict[str, int], max_shard_bytes: int,
                recorded: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """``[(file name, [keys])]``: the recorded layout when it covers exactly these keys (a round
    trip then reproduces the source's files), else :func:`nld_jax.checkpoint.hf_write.shard_plan`."""
    if recorded and set(recorded) == set(sizes) and all(_safe_file_name(f) for f in recorded.values()):
        files: dict[str, list[str]] = {}
        for key, name in recorded.items():  # recorded order: the source's order inside each file
            files.setdefault(name, []).append(key)
        return list(files.items())
    return shard_plan(sizes, max_shard_bytes)

