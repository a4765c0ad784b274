"""An NVIDIA HF checkpoint directory as a conversion source: safetensors only, never pickle.

Directory discovery and most validation are :class:`nld_jax.checkpoint.hf.HFCheckpoint`'s
(index consistency, a tensor in two shards, pickle-only directories). On top of it this module
checks what ``json.load`` would hide (a name twice in an index or in one file's header) and reads
tensors so that resident memory never holds more than the current one: each read maps the file,
and the mapping is dropped when the tensor is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Iterator

import numpy as np

from nld_jax.checkpoint.hf import (ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_INDEX, INDEX_FILE, LORA_DIR,
                                   PICKLE_SUFFIXES, CheckpointError, HFCheckpoint,
                                   parse_adapter_config)
from nld_jax.checkpoint.safetensors_io import SafetensorsFile
from nld_jax.config import NLDConfig, config_from_hf

from checkpoints_convert.key_map import KeyMap

__all__ = ["TensorFiles", "LoraSource", "HFSource", "open_hf_source", "refuse_non_directory",
           "side_files", "copy_side_files"]

# Index and metadata files of either layout: never carried along as "side files".
_NOT_SIDE_FILES = {INDEX_FILE, "nld_metadata.json", "_CHECKPOINT_METADATA", "commit_success.txt"}


def _no_duplicates(pairs, where: str):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"{where}: tensor {key!r} is listed twice")
        seen[key] = value
    return seen


class TensorFiles:
    """The tensors of one safetensors set (a single file, or an index and its shards)."""

    def __init__(self, directory: str, single_file: str, index_file: str):
        self.directory = directory
        index_path = os.path.join(directory, index_file)
        if os.path.exists(index_path):
            with open(index_path) as f:
                json.load(f, object_pairs_hook=lambda p: _no_duplicates(p, index_path))
        ckpt = HFCheckpoint(directory, single_file=single_file, index_file=index_file)
        self._file: dict[str, SafetensorsFile] = {}
        self.order: list[str] = []  # file by file, in data-offset order: reads stay sequential
        for st in ckpt.shards():
            if st.duplicate_names:
                raise CheckpointError(f"{st.path}: tensor {st.duplicate_names[0]!r} is listed twice")
            for key in st.keys_in_file_order():
                self._file[key] = st
                self.order.append(key)
        self.paths = ckpt.files()
        stray = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")
                       and os.path.join(directory, n) not in self.paths)
        self.ignored = [os.path.join(directory, n) for n in stray]

    def keys(self) -> list[str]:
        return list(self.order)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._file[key].dtype(key)

    def nbytes(self, key: str) -> int:
        return self._file[key].nbytes(key)

    def file_of(self, key: str) -> str:
        return os.path.basename(self._file[key].path)

    @contextlib.contextmanager
    def read(self, key: str) -> Iterator[np.ndarray]:
        """The tensor as a read-only memory-mapped array, valid inside the ``with`` only."""
        st = self._file[key]
        try:
            yield st.get(key)
        finally:
            # Drop the file mapping: pages of a mapped file count as resident memory for as
            # long as the mapping lives, so a long-lived map would grow to the whole shard.
            st.close()


@dataclasses.dataclass
class LoraSource:
    directory: str
    adapter_config: dict
    rank: int
    alpha: float
    tensors: TensorFiles
    key_map: KeyMap


@dataclasses.dataclass
class HFSource:
    directory: str
    config: NLDConfig
    config_json: dict
    tensors: TensorFiles
    key_map: KeyMap
    lora: LoraSource | None
    side_files: list[str]  # names of top-level files to carry along (config, tokenizer, code)

    def weight_paths(self) -> list[str]:
        paths = list(self.tensors.paths)
        if self.lora is not None:
            paths += self.lora.tensors.paths
        return paths


def refuse_non_directory(path: str) -> None:
    """A source must be a checkpoint directory; a pickle file gets a message saying why not."""
    if os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"source {path} does not exist")
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path} is a pickle file (PyTorch .bin/.pt); the converter never unpickles, "
                              "because loading a pickle can run arbitrary code. Save it as safetensors first.")
    raise CheckpointError(f"{path} is a file; pass the checkpoint directory (with config.json)")


def side_files(directory: str) -> list[str]:
    """Top-level regular files other than weights: config, tokenizer, generation config, code."""
    names = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or name in _NOT_SIDE_FILES:
            continue
        if name.endswith((".safetensors", *PICKLE_SUFFIXES)) or name.endswith(".safetensors.index.json"):
            continue
        names.append(name)
    return names


def copy_side_files(src: str, dst: str, names: list[str] | None = None) -> list[str]:
    """Copy ``names`` (default: :func:`side_files` of ``src``) verbatim; returns the names."""
    names = side_files(src) if names is None else names
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names


def _open_lora(directory: str, config: NLDConfig) -> LoraSource | None:
    lora_dir = os.path.join(directory, LORA_DIR)
    if not os.path.isdir(lora_dir):
        return None
    cfg_path = os.path.join(lora_dir, ADAPTER_CONFIG)
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{lora_dir} has no {ADAPTER_CONFIG}")
    with open(cfg_path) as f:
        adapter_config = json.load(f)
    rank, alpha = parse_adapter_config(adapter_config, cfg_path)
    tensors = TensorFiles(lora_dir, ADAPTER_FILE, ADAPTER_INDEX)
    key_map = KeyMap.for_lora(config, rank)
    key_map.check_source(tensors.keys(), tensors.shape, tensors.dtype, lora_dir)
    return LoraSource(lora_dir, adapter_config, rank, alpha, tensors, key_map)


def open_hf_source(directory: str, with_lora: bool = True) -> HFSource:
    """Open and fully validate ``directory`` before anything is written."""
    directory = os.path.abspath(directory)
    refuse_non_directory(directory)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{directory} has no config.json")
    with open(cfg_path) as f:
        config_json = json.load(f)
    config = config_from_hf(config_json)  # refuses unknown architecture-changing fields
    tensors = TensorFiles(directory, "model.safetensors", INDEX_FILE)
    key_map = KeyMap.for_params(config)
    key_map.check_source(tensors.keys(), tensors.shape, tensors.dtype, directory)
    lora = _open_lora(directory, config) if with_lora else None
    return HFSource(directory, config, config_json, tensors, key_map, lora, side_files(directory))
