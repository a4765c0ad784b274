"""Builders of the malformed-checkpoint corpus (tests/test_checkpoint_trust.py): everything is
made in a temporary directory from the golden tiny checkpoint, nothing is committed as binary.

``HEADER_CASES`` are whole ``.safetensors`` files that break the format, each with the text the
error must contain; ``VALID_HEADER_CASES`` are odd but valid files both readers must accept;
``ORACLE_DISAGREES`` names the cases where the ``safetensors`` package (the independent oracle)
accepts a file that nld-jax refuses, and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct

import numpy as np

from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "data" / "nld-tiny"


def copy_tiny(tmp_path: pathlib.Path, name: str = "ckpt") -> pathlib.Path:
    """A private copy of the golden checkpoint (with its LoRA), without the golden outputs."""
    dst = tmp_path / name
    shutil.copytree(GOLDEN_DIR, dst, ignore=shutil.ignore_patterns("golden", "train_summary.json"))
    return dst


def edit_json(path: pathlib.Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    st = SafetensorsFile(path)
    tensors = {k: np.array(v) for k, v in st.items()}
    st.close()
    return tensors


def rewrite_tensors(path: pathlib.Path, edit) -> None:
    tensors = read_tensors(path)
    edit(tensors)
    write_safetensors(path, tensors, {"format": "pt"})


def shard(ckpt: pathlib.Path, names_per_file: int = 12) -> dict[str, str]:
    """Split ``model.safetensors`` into shards with an index; returns the weight map."""
    tensors = read_tensors(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(0, len(names), names_per_file):
        fname = f"model-{i // names_per_file + 1:05d}.safetensors"
        write_safetensors(ckpt / fname, {k: tensors[k] for k in names[i:i + names_per_file]}, {"format": "pt"})
        weight_map.update({k: fname for k in names[i:i + names_per_file]})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


# --------------------------------------------------------------------------------------
# Safetensors headers
# --------------------------------------------------------------------------------------

def file_bytes(header, data: bytes | int = b"") -> bytes:
    """A safetensors file: ``header`` (an object, or raw bytes) and ``data`` (bytes, or a length)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data = bytes(data) if isinstance(data, int) else data
    return struct.pack("<Q", len(raw)) + raw + data


def _t(dtype="F32", shape=(4,), offsets=(0, 16), **extra) -> dict:
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (non-tuples go in as they are)
    return {"dtype": dtype, "shape": as_list(shape), "data_offsets": as_list(offsets), **extra}


# name -> (file bytes, text the error must contain (a regex), tensor the error must name or None)
HEADER_CASES: dict[str, tuple[bytes, str, str | None]] = {
    "too_short": (b"\x05\x00\x00", "too short", None),
    "header_length_past_end": (struct.pack("<Q", 1000) + b"{}", "header length", None),
    "header_length_huge": (struct.pack("<Q", 2**63) + b"{}", "header length", None),
    "header_not_utf8": (file_bytes(b'{"a\xff":1}'), "UTF-8", None),
    "header_utf16": (file_bytes("{}".encode("utf-16")), "UTF-8", None),
    "header_not_json": (file_bytes(b'{"w": {"dtype": "F32",'), "not valid JSON", None),
    "header_nested_too_deeply": (file_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON|nested", None),
    "header_a_list": (file_bytes([{"w": _t()}], 16), "JSON object", None),
    "header_a_string": (file_bytes(b'"w"'), "JSON object", None),
    "header_empty": (file_bytes(b""), "not valid JSON", None),
    "metadata_a_list": (file_bytes({"__metadata__": ["format", "pt"]}), "__metadata__", None),
    "metadata_value_not_str": (file_bytes({"__metadata__": {"format": 1}}), "__metadata__", None),
    "entry_not_object": (file_bytes({"w": [1, 2]}), "must be an object", "w"),
    "entry_without_dtype": (file_bytes({"w": {"shape": [4], "data_offsets": [0, 16]}}, 16), "dtype", "w"),
    "unknown_dtype": (file_bytes({"w": _t(dtype="F7")}, 16), "dtype", "w"),
    "dtype_not_str": (file_bytes({"w": _t(dtype=32)}, 16), "dtype", "w"),
    "shape_not_list": (file_bytes({"w": _t(shape=4)}, 16), "shape", "w"),
    "shape_negative": (file_bytes({"w": _t(shape=(-4,))}, 16), "shape", "w"),
    "shape_float": (file_bytes({"w": _t(shape=(4.0,))}, 16), "shape", "w"),
    "shape_bool": (file_bytes({"w": _t(shape=(True, 4))}, 16), "shape", "w"),
    "shape_string": (file_bytes({"w": _t(shape=("4",))}, 16), "shape", "w"),
    "shape_huge_with_zero": (file_bytes({"w": _t(shape=(0, 10**30), offsets=(0, 0))}), "shape", "w"),
    "offsets_three": (file_bytes({"w": _t(offsets=(0, 16, 16))}, 16), "data_offsets", "w"),
    "offsets_one": (file_bytes({"w": _t(offsets=(16,))}, 16), "data_offsets", "w"),
    "offsets_float": (file_bytes({"w": _t(offsets=(0.0, 16.0))}, 16), "data_offsets", "w"),
    "offsets_negative": (file_bytes({"w": _t(offsets=(-16, 0))}, 16), "data_offsets", "w"),
    "offsets_reversed": (file_bytes({"w": _t(offsets=(16, 0))}, 16), "begin after", "w"),
    "bytes_not_shape": (file_bytes({"w": _t(offsets=(0, 12))}, 12), "needs 16", "w"),
    "overlapping_tensors": (file_bytes({"a": _t(), "b": _t()}, 16), "overlaps", "b"),
    "partly_overlapping": (file_bytes({"a": _t(shape=(8,), offsets=(0, 32)), "b": _t(offsets=(16, 32))}, 32),
                           "overlaps", "b"),
    "gap_between_tensors": (file_bytes({"a": _t(), "b": _t(offsets=(24, 40))}, 40), "gap", "b"),
    "gap_at_start": (file_bytes({"a": _t(offsets=(8, 24))}, 24), "gap", "a"),
    "trailing_bytes": (file_bytes({"a": _t()}, 24), "before the end", None),
    "truncated_data": (file_bytes({"a": _t()}, 10), "past the end", None),
    "duplicate_name": (file_bytes(b'{"a":' + json.dumps(_t()).encode() + b',"a":' + json.dumps(_t()).encode() + b"}",
                                  16), "listed twice", "a"),
    "known_to_safetensors_not_us": (file_bytes({"w": _t(dtype="F8_E8M0", shape=(16,))}, 16), "dtype", "w"),
}

# Files both readers accept: odd, but the format allows them.
VALID_HEADER_CASES: dict[str, bytes] = {
    "no_tensors": file_bytes({}),
    "metadata_null": file_bytes({"__metadata__": None, "w": _t()}, 16),
    "extra_entry_field": file_bytes({"w": _t(extra="ignored")}, 16),
    "zero_size_tensor": file_bytes({"e": _t(shape=(0, 4), offsets=(0, 0)), "w": _t()}, 16),
    "unaligned_offsets": file_bytes({"b": _t(dtype="U8", shape=(1,), offsets=(0, 1)),
                                     "w": _t(offsets=(1, 17))}, 17),
    "tensors_out_of_name_order": file_bytes({"z": _t(), "a": _t(offsets=(16, 32))}, 32),
}

# Cases the safetensors package accepts and nld-jax refuses, on purpose.
ORACLE_DISAGREES = {
    "duplicate_name": "safetensors keeps one of two entries with the same name; which one another reader "
                      "keeps is unspecified, so nld-jax refuses the file",
    "known_to_safetensors_not_us": "F8_E8M0 is a safetensors dtype numpy has no type for; nld-jax cannot "
                                   "hold it (and weights must be floats it computes in)",
}


# --------------------------------------------------------------------------------------
# A Hugging Face hub cache laid out by hand
# --------------------------------------------------------------------------------------

def hub_cache(cache: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str = "a" * 40) -> pathlib.Path:
    """``cache/models--ORG--NAME/{blobs/<sha>, snapshots/<commit>/<file> -> ../../blobs/<sha>,
    refs/main}`` holding every file of ``source`` (subfolders included), as huggingface_hub
    writes it; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source)
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
