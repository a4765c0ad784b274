"""Reading and writing safetensors files with numpy, bfloat16 included.

The ``safetensors`` package's numpy backend refuses bfloat16 (numpy has no such dtype), and its
flax backend materialises every tensor on the default JAX device. NVIDIA's checkpoints are bf16,
and the converter must stream one tensor at a time on the host, so we read the (simple, safe:
no pickle) format directly: an 8-byte little-endian header length, a JSON header, raw bytes.
Tensors are memory-mapped, so reading one costs only its own bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsFile", "write_safetensors", "encode_header", "DTYPES"]

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
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """A read-only view of one ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            size = os.path.getsize(self.path)
            if n > size - 8 or n > 100 * 2**20:
                raise SafetensorsError(f"{self.path}: corrupt header length {n}")
            duplicates: list[str] = []
            try:
                header = json.loads(f.read(n), object_pairs_hook=lambda pairs: _dict_noting_duplicates(pairs, duplicates))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{self.path}: header is not JSON ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        # A name listed twice in the header (json keeps the last one): strict readers refuse it.
        self.duplicate_names = duplicates
        self._data_start = 8 + n
        self._entries = header
        data_len = size - self._data_start
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != want:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has inconsistent offsets")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def keys_in_file_order(self) -> list[str]:
        """Tensor names by data offset: reading in this order reads the file sequentially."""
        return sorted(self._entries, key=lambda name: self._entries[name]["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (copy it to keep it past this file)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        raw = self._mmap[self._data_start + begin: self._data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)

    def close(self) -> None:
        self._mmap = None


def _dict_noting_duplicates(pairs, duplicates: list[str]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
        out[key] = value
    return out


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
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
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
