"""An NVIDIA HF checkpoint directory as a conversion source: safetensors only, never pickle.

Every file the converter opens in a source goes through the library's one rule,
:class:`nld_jax.checkpoint.files.CheckpointFiles`: a plain name inside the directory (an index
naming ``../x`` or ``/etc/passwd`` is refused), symlinks followed only within the directory or
into the same hub cache repository's ``blobs/``, regular files only (a FIFO would block the
reader forever), checked with ``stat`` before anything is opened. The safetensors sets are
:class:`nld_jax.checkpoint.hf.HFCheckpoint`'s, given those files (it validates the index, the
headers, a tensor in two shards, pickle-only directories); this module reads tensors so that
resident memory never holds more than the current one: each read maps the file, and the
mapping is dropped when the tensor is done.

Side files (config, tokenizer, generation config, README, code) are copied into the result
verbatim. A side file that is a link out of the source, a dangling link or not a regular file
refuses the whole conversion, by name, whatever the file: copying it would put a file from
elsewhere on the machine (``README.md -> ~/.ssh/id_ed25519``) into a checkpoint that may be
published, and skipping it would publish a checkpoint whose file list silently differs from
its source's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from typing import Iterator

import numpy as np

from nld_jax.checkpoint.files import CheckpointFiles
from nld_jax.checkpoint.hf import (ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_INDEX, INDEX_FILE, LORA_DIR,
                                   PICKLE_SUFFIXES, CheckpointError, HFCheckpoint,
                                   parse_adapter_config)
from nld_jax.checkpoint.directory import load_configs
from nld_jax.checkpoint.safetensors_io import SafetensorsFile
from nld_jax.config import NLDConfig
from nld_jax.vision.config import VisionConfig
from nld_jax.vision.params import VISION_PREFIXES

from checkpoints_convert.key_map import KeyMap

__all__ = ["TensorFiles", "LoraSource", "HFSource", "open_hf_source", "read_configs", "refuse_non_directory",
           "side_files", "copy_side_files"]

CONFIG_FILE = "config.json"
# Index and metadata files of either layout: never carried along as "side files".
_NOT_SIDE_FILES = {INDEX_FILE, "nld_metadata.json", "_CHECKPOINT_METADATA", "commit_success.txt"}


class TensorFiles:
    """The tensors of one safetensors set (a single file, or an index and its shards)."""

    def __init__(self, files: CheckpointFiles, single_file: str, index_file: str):
        self.files = files
        self.directory = files.directory
        ckpt = HFCheckpoint(files, single_file=single_file, index_file=index_file)
        self.index_file = index_file if files.exists(index_file) else None
        self.names = [os.path.basename(path) for path in ckpt.files()]  # plain names: the rule refuses others
        self._file: dict[str, SafetensorsFile] = {}
        self._stored: dict[str, str] = {}  # NVIDIA's name -> the file's (transformers' layouts differ)
        self.layout = ckpt.layout
        self.order: list[str] = []  # file by file, in data-offset order: reads stay sequential
        for st in ckpt.shards():
            for stored in st.keys_in_file_order():
                key = ckpt.canonical_name(stored)
                self._file[key], self._stored[key] = st, stored
                self.order.append(key)
        self.paths = ckpt.files()
        stray = sorted(n for n in files.listdir() if n.endswith(".safetensors")
                       and os.path.join(self.directory, n) not in self.paths)
        self.ignored = [os.path.join(self.directory, n) for n in stray]

    def keys(self) -> list[str]:
        return list(self.order)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file[key].shape(self._stored[key])

    def dtype(self, key: str) -> np.dtype:
        return self._file[key].dtype(self._stored[key])

    def nbytes(self, key: str) -> int:
        return self._file[key].nbytes(self._stored[key])

    def file_of(self, key: str) -> str:
        return os.path.basename(self._file[key].path)

    def read_files(self) -> dict[str, str]:
        """``{name: path}`` of every file read: the shards and the index."""
        names = self.names + ([self.index_file] if self.index_file else [])
        return {name: self.files.path(name) for name in names}

    @contextlib.contextmanager
    def read(self, key: str) -> Iterator[np.ndarray]:
        """The tensor as a read-only memory-mapped array, valid inside the ``with`` only."""
        st = self._file[key]
        try:
            yield st.get(self._stored[key])
        finally:
            # Drop the file mapping: pages of a mapped file count as resident memory for as
            # long as the mapping lives, so a long-lived map would grow to the whole shard.
            st.close()


@dataclasses.dataclass
class LoraSource:
    files: CheckpointFiles
    adapter_config: dict
    rank: int
    alpha: float
    tensors: TensorFiles
    key_map: KeyMap

    @property
    def directory(self) -> str:
        return self.files.directory


@dataclasses.dataclass
class HFSource:
    files: CheckpointFiles
    config: NLDConfig
    tensors: TensorFiles
    key_map: KeyMap
    lora: LoraSource | None
    side_files: list[str]  # names of top-level files to carry along (config, tokenizer, code)
    vision_config: VisionConfig | None = None  # a VLM's tower and projector, else None
    vision_key_map: KeyMap | None = None  # their tensors (encoder.vision_tower.*, ...) -> the vision item

    @property
    def directory(self) -> str:
        return self.files.directory

    def read_files(self) -> dict[str, str]:
        """``{name relative to the source: path}`` of every file the conversion reads (for hashing)."""
        out = dict(self.tensors.read_files())
        if self.lora is not None:
            lora_files = {**self.lora.tensors.read_files(), ADAPTER_CONFIG: self.lora.files.path(ADAPTER_CONFIG)}
            out.update({f"{LORA_DIR}/{name}": path for name, path in sorted(lora_files.items())})
        out.update({name: self.files.path(name) for name in self.side_files})
        return out


def refuse_non_directory(path: str) -> None:
    """A source must be a checkpoint directory; a pickle file gets a message saying why not."""
    if os.path.isdir(path):
        return
    if not os.path.lexists(path):
        raise FileNotFoundError(f"source {path} does not exist")
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path} is a pickle file (PyTorch .bin/.pt); the converter never unpickles, "
                              "because loading a pickle can run arbitrary code. Save it as safetensors first.")
    raise CheckpointError(f"{path} is not a directory; pass the checkpoint directory (with config.json)")


def side_files(files: CheckpointFiles) -> list[str]:
    """Top-level files other than weights: config, tokenizer, generation config, README, code.

    Each must obey the rule (see the module docstring): a link out, a dangling link, a FIFO or
    a device refuses the conversion by name. Subfolders are neither carried nor read."""
    names = []
    for name in files.listdir():
        if name in _NOT_SIDE_FILES or name.endswith((".safetensors", ".safetensors.index.json", *PICKLE_SUFFIXES)):
            continue
        if os.path.isdir(os.path.join(files.directory, name)):
            continue
        try:
            files.path(name)
        except (CheckpointError, FileNotFoundError) as e:
            raise CheckpointError(f"{e}; files beside the weights are copied into the result, so replace the "
                                  f"link by the file itself or remove {name}") from None
        names.append(name)
    return names


def copy_side_files(files: CheckpointFiles, dst: str, names: list[str] | None = None) -> list[str]:
    """Copy ``names`` (default: :func:`side_files`) verbatim into ``dst``; returns the names."""
    names = side_files(files) if names is None else names
    for name in names:
        with files.open(name) as source, open(os.path.join(dst, name), "wb") as target:
            shutil.copyfileobj(source, target)
    return names


def _open_lora(files: CheckpointFiles, config: NLDConfig) -> LoraSource | None:
    if not files.exists(LORA_DIR):
        return None
    if not files.is_dir(LORA_DIR):  # a link out of the source is refused by name
        raise CheckpointError(f"{files.shown(LORA_DIR)} is not a directory")
    lora = files.subdirectory(LORA_DIR)
    if not lora.exists(ADAPTER_CONFIG):
        raise CheckpointError(f"{lora.directory} has no {ADAPTER_CONFIG}")
    adapter_config = lora.read_json(ADAPTER_CONFIG)
    rank, alpha = parse_adapter_config(adapter_config, lora.shown(ADAPTER_CONFIG))
    tensors = TensorFiles(lora, ADAPTER_FILE, ADAPTER_INDEX)
    key_map = KeyMap.for_lora(config, rank)
    key_map.check_source(tensors.keys(), tensors.shape, tensors.dtype, lora.directory)
    return LoraSource(lora, adapter_config, rank, alpha, tensors, key_map)


def read_configs(files: CheckpointFiles) -> tuple[NLDConfig, VisionConfig | None]:
    """``config.json`` of ``files``, read under the rule: the text model's config and a VLM's
    vision config (None for a text model); errors name the file."""
    if not files.exists(CONFIG_FILE):
        raise CheckpointError(f"{files.directory} has no {CONFIG_FILE}")
    return load_configs(files)  # refuses unknown architecture-changing fields, naming the file


def split_vision_keys(keys: list[str], vision: bool) -> tuple[list[str], list[str]]:
    """``(text keys, vision keys)`` of a source; for a text model every key is the text model's
    (a vision tensor there is then an unknown tensor, as any other)."""
    if not vision:
        return list(keys), []
    return [k for k in keys if not k.startswith(VISION_PREFIXES)], [k for k in keys if k.startswith(VISION_PREFIXES)]


def open_hf_source(directory: str, with_lora: bool = True) -> HFSource:
    """Open and fully validate ``directory`` before anything is written."""
    directory = os.path.abspath(os.fspath(directory))
    refuse_non_directory(directory)
    files = CheckpointFiles(directory)
    config, vision_config = read_configs(files)
    tensors = TensorFiles(files, "model.safetensors", INDEX_FILE)
    text_keys, vision_keys = split_vision_keys(tensors.keys(), vision_config is not None)
    key_map = KeyMap.for_params(config)
    key_map.check_source(text_keys, tensors.shape, tensors.dtype, directory)
    vision_key_map = None
    if vision_config is not None:
        vision_key_map = KeyMap.for_vision(vision_config)
        vision_key_map.check_source(vision_keys, tensors.shape, tensors.dtype, directory)
    lora = _open_lora(files, config) if with_lora else None
    return HFSource(files, config, tensors, key_map, lora, side_files(files), vision_config, vision_key_map)
