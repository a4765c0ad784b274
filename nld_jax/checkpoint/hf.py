"""Loading NVIDIA's HF checkpoint directories (safetensors only, no torch, no pickle).

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; instruct checkpoints add the PEFT draft LoRA in
``linear_spec_lora/``. The mapping to our layout comes from :mod:`nld_jax.params`, and the
accounting is strict: a missing tensor, an unknown tensor, a wrong shape or dtype, or an index
that disagrees with its shards is an error that names the file and the key. Every file is
opened through :class:`~nld_jax.checkpoint.files.CheckpointFiles`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.files import CheckpointFiles, plain_name
from nld_jax.checkpoint.finite import first_nonfinite
from nld_jax.checkpoint.key_layout import NVIDIA, KeyLayout, detect_layout
from nld_jax.checkpoint.safetensors_io import SafetensorsFile
from nld_jax.config import NLDConfig
from nld_jax.params import ParamSpec, lora_specs, param_specs, tree_from_flat
from nld_jax.vision.config import VisionConfig
from nld_jax.vision.params import VISION_PREFIXES, vision_specs

__all__ = ["CheckpointError", "HFCheckpoint", "read_hf_params", "read_hf_vision", "read_hf_lora", "hf_lora_rank", "parse_adapter_config",
           "read_weight_map", "lora_files", "expand_keys", "check_tensor_set", "check_layer_count", "key_listing",
           "PICKLE_SUFFIXES", "FLOAT_DTYPES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names inside LORA_DIR
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
# Floating dtypes a checkpoint may store weights in (by numpy name).
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
# The layer index in a key ("encoder.layers.12.mlp...", PEFT's "base_model.model.encoder.layers.12...").
_LAYER = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")


def read_weight_map(files: CheckpointFiles, index_file: str) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> plain shard file name."""
    shown = files.shown(index_file)
    index = files.read_json_object(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{shown}: 'weight_map' must be an object of tensor name -> shard file name, "
                              f"got {type(weight_map).__name__}")
    for key, name in weight_map.items():
        plain_name(name, f"{shown}: weight_map[{key!r}]")
    return weight_map


class HFCheckpoint:
    """The tensors of an HF checkpoint directory, possibly sharded, opened lazily.

    ``directory`` is a path or a :class:`CheckpointFiles` (e.g. ``linear_spec_lora/`` of one).
    Tensors are named by NVIDIA's names whatever layout the files use (transformers' Mistral3
    ones are renamed, :mod:`nld_jax.checkpoint.key_layout`); :meth:`stored_name` gives the
    name in the file."""

    def __init__(self, directory: str | os.PathLike | CheckpointFiles, single_file: str = SINGLE_FILE,
                 index_file: str = INDEX_FILE):
        self.checkpoint_files = CheckpointFiles.of(directory)
        files = self.checkpoint_files
        self.directory = files.directory
        weight_map: dict[str, str] | None = None
        if files.exists(index_file):
            weight_map = read_weight_map(files, index_file)
            names = sorted(set(weight_map.values()))
        elif files.exists(single_file):
            names = [single_file]
        else:
            pickles = [n for n in files.listdir() if n.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(
                    f"{self.directory} holds only pickle weights ({', '.join(sorted(pickles))}); nld_jax "
                    "never unpickles (it can run arbitrary code). Convert them to safetensors first.")
            raise CheckpointError(f"{self.directory} has neither {single_file} nor {index_file}")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        for name in names:
            if not files.exists(name):
                raise CheckpointError(f"{files.shown(name)}: shard listed in {index_file} is missing")
            st = SafetensorsFile(files.shown(name), files.path(name))
            self._files[name] = st
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {files.shown(self._where[key])} and "
                                          f"{files.shown(name)}")
                self._where[key] = name
        if weight_map is not None:
            index = files.shown(index_file)
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise CheckpointError(f"{index} says {key!r} is in {name}, but it is not there")
            unlisted = [key for key in self._where if key not in weight_map]
            if unlisted:
                raise CheckpointError(f"{index} does not list tensor(s) {key_listing(unlisted)} that "
                                      f"{files.shown(self._where[unlisted[0]])} holds")
        self.layout: KeyLayout = detect_layout(self._where, self.directory, lambda k: files.shown(self._where[k]))
        self._stored: dict[str, str] = {}  # NVIDIA's name -> the name in the file (only where they differ)
        if self.layout is not NVIDIA:
            where: dict[str, str] = {}
            for stored, name in self._where.items():
                key = self.layout.to_canonical(stored)
                if key in where:
                    raise CheckpointError(f"{files.shown(name)}: tensors {self._stored.get(key, key)!r} and "
                                          f"{stored!r} are both {key!r} in nld_jax's names")
                where[key] = name
                if key != stored:
                    self._stored[key] = stored
            self._where = where

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def stored_name(self, key: str) -> str:
        """The name the file gives tensor ``key`` (NVIDIA's name)."""
        return self._stored.get(key, key)

    def canonical_name(self, stored: str) -> str:
        """NVIDIA's name of the tensor the file calls ``stored``."""
        return self.layout.to_canonical(stored)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._where[key]].shape(self.stored_name(key))

    def dtype(self, key: str) -> np.dtype:
        return self._files[self._where[key]].dtype(self.stored_name(key))

    def get(self, key: str) -> np.ndarray:
        return self._files[self._where[key]].get(self.stored_name(key))

    def file_of(self, key: str) -> str:
        """The path (as shown in errors) of the file holding ``key``."""
        return self._files[self._where[key]].path

    def files(self) -> list[str]:
        return [st.path for st in self._files.values()]

    def shards(self) -> list[SafetensorsFile]:
        """The opened files, in :meth:`files` order."""
        return list(self._files.values())


def expand_keys(spec: ParamSpec, num_layers: int) -> list[str]:
    return [spec.hf_key.format(n=n) for n in range(num_layers)] if spec.stacked else [spec.hf_key]


def check_tensor_set(where: str, keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]],
                     expected: Mapping[str, tuple[int, ...]],
                     file_of: Callable[[str], str] | None = None) -> None:
    """Exactly the ``expected`` tensors, each with its shape; an error names the offending keys
    (and, given ``file_of``, the file holding them). Shared by the loader and the converter's key map."""
    keys = list(keys)
    present = set(keys)
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {key_listing(missing)}")
    unknown = [k for k in keys if k not in expected]
    if unknown:
        at = file_of(unknown[0]) if file_of else where
        raise CheckpointError(f"{at}: unknown tensor(s) {key_listing(unknown)}: not part of the "
                              "architecture that config.json describes")
    for key, shape in expected.items():
        if tuple(shape_of(key)) != tuple(shape):
            at = file_of(key) if file_of else where
            raise CheckpointError(f"{at}: tensor {key!r} has shape {list(shape_of(key))}, "
                                  f"config.json implies {list(shape)}")


def check_layer_count(where: str, keys: Iterable[str], num_layers: int) -> None:
    """The layer indices the keys hold are exactly ``0 .. num_layers - 1``. Checked before the
    expected keys are expanded, so a config that claims far more layers than the files hold is
    refused by what the files say, not by building its key list."""
    held = sorted({int(m.group(1)) for k in keys if (m := _LAYER.search(k))})
    # Distinct sorted non-negative ints equal range(num_layers) iff length and ends agree; no
    # list of num_layers is ever built (the config may claim millions).
    if len(held) == num_layers and (not held or (held[0] == 0 and held[-1] == num_layers - 1)):
        return
    if not held:
        what = "no layers"
    elif held == list(range(held[0], held[-1] + 1)):
        what = f"layers {held[0]}..{held[-1]}"
    else:
        what = f"layers {key_listing([str(n) for n in held], 8)}"
    raise CheckpointError(f"{where}: config.json says {num_layers} layers; the safetensors hold {what}")


def key_listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_accounting(ckpt: HFCheckpoint, specs: dict[str, ParamSpec], num_layers: int,
                      keys: list[str] | None = None) -> None:
    """``keys`` (default: all of the checkpoint's) are exactly what ``specs`` expect."""
    keys = ckpt.keys() if keys is None else keys
    check_layer_count(ckpt.directory, keys, num_layers)
    expected = {key: spec.hf_shape for spec in specs.values() for key in expand_keys(spec, num_layers)}
    check_tensor_set(ckpt.directory, keys, ckpt.shape, expected, ckpt.file_of)
    for key in expected:
        if ckpt.dtype(key).name not in FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has dtype {ckpt.dtype(key).name}; "
                                  f"weights must be one of {FLOAT_DTYPES} (quantized safetensors are not read: "
                                  "quantize NVIDIA's bf16 weights with load(quantize='int8') or nld-convert --quantize)")


def read_param(ckpt: HFCheckpoint, spec: ParamSpec, num_layers: int, dtype, check_finite: bool = False) -> np.ndarray:
    """One parameter in our layout, as a host array of ``dtype``; with ``check_finite`` a NaN/Inf
    (after the cast: float32 beyond bf16's range becomes Inf) is an error naming the tensor."""
    keys = expand_keys(spec, num_layers)
    out = np.empty(spec.shape, dtype=dtype)
    for n, key in enumerate(keys):
        part = out[n] if spec.stacked else out
        part[...] = spec.to_ours(ckpt.get(key))
        if check_finite and (at := first_nonfinite(part)) is not None:
            value = part.reshape(-1)[at]
            raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} holds a non-finite value ({value} "
                                  f"as {np.dtype(dtype).name}); refusing weights with NaN or Inf")
    return out


def _place(host: np.ndarray, sharding) -> Any:
    # Each process copies only the slices of its own devices (single device, mesh or multi-host).
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _is_vision_key(key: str) -> bool:
    return key.startswith(VISION_PREFIXES)


def _read_tree(ckpt: HFCheckpoint, specs: dict[str, ParamSpec], num_layers: int, dtype,
               sharding_of: Callable[[str], Any], check_finite: bool,
               finish: Callable[[str, Any], Any] | None = None) -> dict:
    flat = {}
    for path, spec in specs.items():
        np_dtype = np.dtype(ckpt.dtype(expand_keys(spec, num_layers)[0])) if dtype is None else np.dtype(dtype)
        flat[path] = _place(read_param(ckpt, spec, num_layers, np_dtype, check_finite), sharding_of(path))
        if finish is not None:
            flat[path] = finish(path, flat[path])
    return tree_from_flat(flat)


def read_hf_params(directory: str | os.PathLike | CheckpointFiles, config: NLDConfig, dtype,
                   sharding_of: Callable[[str], Any], check_finite: bool = False,
                   finish: Callable[[str, Any], Any] | None = None, vision: bool = False) -> dict:
    """All base weights in our layout, as a tree; each leaf is put into ``sharding_of(leaf path)``
    in ``dtype`` (None: the stored dtype), one tensor on the host at a time, then handed to
    ``finish(leaf path, array)`` when given (``load(quantize=)`` quantizes it there).

    ``vision``: the checkpoint is a VLM's; its vision tensors (``encoder.vision_tower.*``,
    ``encoder.multi_modal_projector.*``) are :func:`read_hf_vision`'s and left out of the text
    model's accounting. Without it they are unknown tensors, as any other."""
    ckpt = HFCheckpoint(directory)
    specs = param_specs(config)
    keys = [k for k in ckpt.keys() if not _is_vision_key(k)] if vision else None
    _check_accounting(ckpt, specs, config.L, keys)
    return _read_tree(ckpt, specs, config.L, dtype, sharding_of, check_finite, finish)


def read_hf_vision(directory: str | os.PathLike | CheckpointFiles, config: VisionConfig, dtype,
                   sharding_of: Callable[[str], Any], check_finite: bool = False) -> dict:
    """The vision tower and projector weights (``{"tower": ..., "projector": ...}``) of a VLM
    checkpoint, under the same accounting as the text weights (exactly the declared tensors,
    shapes, floating dtypes), not quantized."""
    ckpt = HFCheckpoint(directory)
    specs = vision_specs(config)
    _check_accounting(ckpt, specs, config.Lv, [k for k in ckpt.keys() if _is_vision_key(k)])
    return _read_tree(ckpt, specs, config.Lv, dtype, sharding_of, check_finite)


def parse_adapter_config(adapter_config: Any, where: str) -> tuple[int, float]:
    """``(rank, alpha)`` of a PEFT ``adapter_config.json`` for NLD's draft LoRA; anything else
    (other target modules, per-layer patterns, DoRA, biases...) is refused by name."""
    if not isinstance(adapter_config, dict):
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} must hold a JSON object, got {type(adapter_config).__name__}")
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or sorted(map(str, targets)) != ["o_proj"]:
        raise CheckpointError(f"{where}: LoRA target_modules {targets} unsupported (NLD's draft LoRA is o_proj only)")
    for field in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(field):
            raise CheckpointError(f"{where}: per-layer {field} is not supported")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if adapter_config.get(field):
            raise CheckpointError(f"{where}: {field}=true is not supported")
    if adapter_config.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: LoRA bias={adapter_config['bias']!r} is not supported")
    if adapter_config.get("layers_to_transform") is not None:
        raise CheckpointError(f"{where}: layers_to_transform is not supported")
    rank, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 65536:
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} field r={rank!r} must be an integer in [1, 65536]")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} field lora_alpha={alpha!r} must be a positive number")
    return rank, float(alpha)


def lora_files(directory: str | os.PathLike | CheckpointFiles) -> CheckpointFiles | None:
    """The files of the draft LoRA: ``linear_spec_lora/`` (or the directory itself when it is a
    PEFT adapter folder), or None when there is none."""
    files = CheckpointFiles.of(directory)
    if files.exists(LORA_DIR):
        if not files.is_dir(LORA_DIR):  # refuses a link out of the checkpoint by name
            raise CheckpointError(f"{files.shown(LORA_DIR)} is not a directory")
        return files.subdirectory(LORA_DIR)
    return files if files.exists(ADAPTER_CONFIG) else None


def _adapter_config(lora: CheckpointFiles) -> tuple[int, float]:
    if not lora.exists(ADAPTER_CONFIG):
        raise CheckpointError(f"{lora.directory} has no {ADAPTER_CONFIG}")
    return parse_adapter_config(lora.read_json(ADAPTER_CONFIG), lora.shown(ADAPTER_CONFIG))


def hf_lora_rank(directory: str | os.PathLike | CheckpointFiles) -> int | None:
    """The rank of the draft LoRA in ``directory/linear_spec_lora`` (or ``directory``), or None."""
    lora = lora_files(directory)
    return None if lora is None else _adapter_config(lora)[0]


def read_hf_lora(directory: str | os.PathLike | CheckpointFiles, config: NLDConfig,
                 sharding_of: Callable[[str], Any], check_finite: bool = False) -> dict | None:
    """The draft LoRA ``{A, B, scale}`` of ``directory/linear_spec_lora`` (or of ``directory``
    itself), or None; leaves go into ``sharding_of("A" | "B" | "scale")``."""
    lora_dir = lora_files(directory)
    if lora_dir is None:
        return None
    rank, alpha = _adapter_config(lora_dir)
    ckpt = HFCheckpoint(lora_dir, single_file=ADAPTER_FILE, index_file=ADAPTER_INDEX)
    specs = lora_specs(config, rank)
    _check_accounting(ckpt, specs, config.L)
    # The adapter runs in float32 whatever the model dtype (PEFT casts its input to the adapter dtype).
    lora = {name: _place(read_param(ckpt, spec, config.L, np.float32, check_finite), sharding_of(name))
            for name, spec in specs.items()}
    lora["scale"] = _place(np.asarray(alpha / rank, np.float32), sharding_of("scale"))
    return lora
