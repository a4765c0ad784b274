"""Reading and writing safetensors files with numpy, bfloat16 included.

The ``safetensors`` package's numpy backend refuses bfloat16 (numpy has no such dtype), and its
flax backend materialises every tensor on the default JAX device. NVIDIA's checkpoints are bf16,
and the converter must stream one tensor at a time on the host, so we read the (simple, safe:
no pickle) format directly: an 8-byte little-endian header length, a JSON header, raw bytes.
Tensors are memory-mapped, so reading one costs only its own bytes.

A header comes from a stranger, so :func:`parse_header` checks it by the safetensors library's
own rules before any offset is used: a sane length, strict UTF-8 JSON object, ``__metadata__``
of strings, every entry a known dtype, a shape of non-negative integers and two integer offsets
whose span is exactly the shape's bytes, and the entries, in offset order, tiling the data
buffer from its first byte to the end of the file (no gap, no two tensors on the same bytes).
We are stricter in one way: a tensor name listed twice is refused (the library keeps one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.files import open_regular

__all__ = ["SafetensorsFile", "SafetensorsError", "TensorEntry", "parse_header", "write_safetensors",
           "encode_header", "DTYPES", "MAX_HEADER_BYTES"]

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
_MAX_DIM = 2**63 - 1  # numpy's largest dimension


class SafetensorsError(CheckpointError):
    """A safetensors file that breaks the format; the message names the file (and tensor)."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data buffer (after the header)
    end: int


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(where: str, name: str, raw: Any) -> TensorEntry:
    at = f"{where}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{at}: header entry must be an object, got {type(raw).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in raw:
            raise SafetensorsError(f"{at}: header entry lacks {field!r}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{at} has unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise SafetensorsError(f"{at}: shape {shape!r} must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise SafetensorsError(f"{at}: data_offsets {offsets!r} must be two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise SafetensorsError(f"{at}: data_offsets {offsets} begin after they end (inconsistent offsets)")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: no overflow
    if end - begin != nbytes:
        raise SafetensorsError(f"{at}: data_offsets {offsets} span {end - begin} bytes, but shape {shape} of "
                               f"{dtype} needs {nbytes} (inconsistent offsets)")
    return TensorEntry(DTYPES[dtype], tuple(shape), begin, end)


def parse_header(raw: bytes, data_bytes: int, where: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``({name: entry}, metadata)`` of header bytes ``raw`` followed by ``data_bytes`` of tensor
    data; anything the safetensors library would refuse (and a duplicate name) is an error naming
    ``where`` and, where there is one, the tensor."""
    duplicates: list[str] = []

    def pairs_hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                duplicates.append(key)
            out[key] = value
        return out

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: header is not valid UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise SafetensorsError(f"{where}: header is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise SafetensorsError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: header must be a JSON object, got {type(header).__name__}")
    if duplicates:
        raise SafetensorsError(f"{where}: tensor {duplicates[0]!r} is listed twice in the header")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: __metadata__ must be an object of strings, got {metadata!r:.100}")
    entries = {}
    for name, raw_entry in header.items():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise SafetensorsError(f"{where}: tensor name {name!r} is not valid UTF-8") from None
        entries[name] = _entry(where, name, raw_entry)
    # Tile check: in offset order, each tensor starts where the previous one ended.
    position = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != position:
            problem = "overlaps the tensor before it" if e.begin < position else f"leaves a gap at byte {position}"
            raise SafetensorsError(f"{where}: tensor {name!r} at data_offsets [{e.begin}, {e.end}] {problem} "
                                   "(inconsistent offsets)")
        position = e.end
    if position != data_bytes:
        how = "past the end of the file (truncated?)" if position > data_bytes else \
            f"{data_bytes - position} bytes before the end of the file"
        raise SafetensorsError(f"{where}: tensor data ends {how}: header covers {position} bytes, the file holds "
                               f"{data_bytes} (inconsistent offsets)")
    return entries, metadata


class SafetensorsFile:
    """A read-only view of one ``.safetensors`` file, its header checked by :func:`parse_header`.

    ``path`` is the name errors show (e.g. a hub snapshot's link); ``real`` the file to read,
    already resolved under :class:`~nld_jax.checkpoint.files.CheckpointFiles`' rule (default:
    ``path``). Either way only a regular file is opened.
    """

    def __init__(self, path: str | os.PathLike, real: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        self._real = os.fspath(real) if real is not None else self.path
        with open_regular(self._real, self.path) as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{self.path}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{self.path}: corrupt header length {n} (more than {MAX_HEADER_BYTES})")
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: corrupt header length {n}; the file holds {size} bytes")
            header = f.read(n)
        self._data_start = 8 + n
        self._entries, self.metadata = parse_header(header, size - self._data_start, self.path)
        self._mmap = None

    # The validator refuses a name listed twice, so this is always empty; kept for readers that
    # checked it before the validator did.
    duplicate_names: list[str] = []

    def keys(self) -> list[str]:
        return list(self._entries)

    def keys_in_file_order(self) -> list[str]:
        """Tensor names by data offset: reading in this order reads the file sequentially."""
        return sorted(self._entries, key=lambda name: self._entries[name].begin)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name].dtype

    def nbytes(self, name: str) -> int:
        e = self._entries[name]
        return e.end - e.begin

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (copy it to keep it past this file)."""
        e = self._entries[name]
        if e.end == e.begin:  # nothing to map (and an empty data buffer cannot be mapped)
            return np.zeros(e.shape, e.dtype)
        if self._mmap is None:
            with open_regular(self._real, self.path) as f:
                self._mmap = np.memmap(f, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + e.begin: self._data_start + e.end]
        return raw.view(e.dtype).reshape(e.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)

    def close(self) -> None:
        self._mmap = None


def encode_header(entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The bytes before the tensor data (length + JSON header) for ``(name, dtype, shape)`` in
    file order, and each tensor's byte count."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        dt = np.dtype(dtype)
        if dt not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {dt}")
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
    return struct.pack("<Q", len(blob)) + blob, sizes


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in the given order) to ``path``; bf16 arrays use ml_dtypes.bfloat16."""
    prefix, _ = encode_header(((name, arr.dtype, arr.shape) for name, arr in tensors.items()), metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
