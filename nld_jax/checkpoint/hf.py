"""Loading NVIDIA's HF checkpoint directories (safetensors only, no torch, no pickle).

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; instruct checkpoints add the PEFT draft LoRA in
``linear_spec_lora/``. The mapping to our layout comes from :mod:`nld_jax.params`, and the
accounting is strict: a missing tensor, an unknown tensor or a wrong shape is an error that
names the key.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from nld_jax.checkpoint.safetensors_io import SafetensorsFile
from nld_jax.config import NLDConfig
from nld_jax.params import ParamSpec, lora_specs, param_specs, tree_from_flat

__all__ = ["CheckpointError", "HFCheckpoint", "read_hf_params", "read_hf_lora", "hf_lora_rank", "parse_adapter_config",
           "expand_keys", "check_tensor_set", "key_listing", "PICKLE_SUFFIXES", "FLOAT_DTYPES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names inside LORA_DIR
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
# Floating dtypes a checkpoint may store weights in (by numpy name).
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold exactly the tensors the config implies."""


class HFCheckpoint:
    """The tensors of an HF checkpoint directory, possibly sharded, opened lazily."""

    def __init__(self, directory: str | os.PathLike, single_file: str = "model.safetensors",
                 index_file: str = INDEX_FILE):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        index_path = os.path.join(self.directory, index_file)
        single_path = os.path.join(self.directory, single_file)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single_path):
            files = [single_file]
            weight_map = None
        else:
            pickles = [n for n in os.listdir(self.directory) if n.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(
                    f"{self.directory} holds only pickle weights ({', '.join(sorted(pickles))}); nld_jax "
                    "never unpickles (it can run arbitrary code). Convert them to safetensors first.")
            raise CheckpointError(f"{self.directory} has neither {single_file} nor {index_file}")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"shard {name} listed in {index_file} is missing")
            st = SafetensorsFile(path)
            self._files[name] = st
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key]} and {name}")
                self._where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise CheckpointError(f"index says {key!r} is in {name}, but it is not there")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._where[key]].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._files[self._where[key]].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self._files[self._where[key]].get(key)

    def files(self) -> list[str]:
        return [os.path.join(self.directory, n) for n in self._files]

    def shards(self) -> list[SafetensorsFile]:
        """The opened files, in :meth:`files` order."""
        return list(self._files.values())


def expand_keys(spec: ParamSpec, num_layers: int) -> list[str]:
    return [spec.hf_key.format(n=n) for n in range(num_layers)] if spec.stacked else [spec.hf_key]


def check_tensor_set(where: str, keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]],
                     expected: Mapping[str, tuple[int, ...]]) -> None:
    """Exactly the ``expected`` tensors, each with its shape; an error names the offending keys.
    Shared by the loader and the converter's key map."""
    keys = list(keys)
    present = set(keys)
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {key_listing(missing)}")
    unknown = [k for k in keys if k not in expected]
    if unknown:
        raise CheckpointError(f"{where}: unknown tensor(s) {key_listing(unknown)}: not part of the "
                              "architecture that config.json describes")
    for key, shape in expected.items():
        if tuple(shape_of(key)) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape_of(key))}, "
                                  f"config.json implies {list(shape)}")


def key_listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_accounting(ckpt: HFCheckpoint, specs: dict[str, ParamSpec], num_layers: int) -> None:
    expected = {key: spec.hf_shape for spec in specs.values() for key in expand_keys(spec, num_layers)}
    check_tensor_set(ckpt.directory, ckpt.keys(), ckpt.shape, expected)


def read_param(ckpt: HFCheckpoint, spec: ParamSpec, num_layers: int, dtype) -> np.ndarray:
    """One parameter in our layout, as a host array of ``dtype``."""
    keys = expand_keys(spec, num_layers)
    if not spec.stacked:
        return np.asarray(spec.to_ours(ckpt.get(keys[0])), dtype=dtype)
    out = np.empty(spec.shape, dtype=dtype)
    for n, key in enumerate(keys):
        out[n] = spec.to_ours(ckpt.get(key))
    return out


def _place(host: np.ndarray, sharding) -> Any:
    # Each process copies only the slices of its own devices (single device, mesh or multi-host).
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def read_hf_params(directory: str | os.PathLike, config: NLDConfig, dtype,
                   sharding_of: Callable[[str], Any]) -> dict:
    """All base weights in our layout, as a tree; each leaf is put into ``sharding_of(leaf path)``
    in ``dtype`` (None: the stored dtype), one tensor on the host at a time."""
    ckpt = HFCheckpoint(directory)
    specs = param_specs(config)
    _check_accounting(ckpt, specs, config.L)
    flat = {}
    for path, spec in specs.items():
        np_dtype = np.dtype(ckpt.dtype(expand_keys(spec, config.L)[0])) if dtype is None else np.dtype(dtype)
        flat[path] = _place(read_param(ckpt, spec, config.L, np_dtype), sharding_of(path))
    return tree_from_flat(flat)


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


def _lora_dir(directory: str) -> str | None:
    lora_dir = os.path.join(directory, LORA_DIR)
    if os.path.isdir(lora_dir):
        return lora_dir
    return directory if os.path.exists(os.path.join(directory, ADAPTER_CONFIG)) else None


def _adapter_config(lora_dir: str) -> tuple[int, float]:
    cfg_path = os.path.join(lora_dir, ADAPTER_CONFIG)
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{lora_dir} has no {ADAPTER_CONFIG}")
    try:
        with open(cfg_path) as f:
            return parse_adapter_config(json.load(f), cfg_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None


def hf_lora_rank(directory: str | os.PathLike) -> int | None:
    """The rank of the draft LoRA in ``directory/linear_spec_lora`` (or ``directory``), or None."""
    lora_dir = _lora_dir(os.fspath(directory))
    return None if lora_dir is None else _adapter_config(lora_dir)[0]


def read_hf_lora(directory: str | os.PathLike, config: NLDConfig, sharding_of: Callable[[str], Any]) -> dict | None:
    """The draft LoRA ``{A, B, scale}`` of ``directory/linear_spec_lora`` (or of ``directory``
    itself), or None; leaves go into ``sharding_of("A" | "B" | "scale")``."""
    lora_dir = _lora_dir(os.fspath(directory))
    if lora_dir is None:
        return None
    rank, alpha = _adapter_config(lora_dir)
    ckpt = HFCheckpoint(lora_dir, single_file=ADAPTER_FILE, index_file=ADAPTER_INDEX)
    specs = lora_specs(config, rank)
    _check_accounting(ckpt, specs, config.L)
    # The adapter runs in float32 whatever the model dtype (PEFT casts its input to the adapter dtype).
    lora = {name: _place(read_param(ckpt, spec, config.L, np.float32), sharding_of(name))
            for name, spec in specs.items()}
    lora["scale"] = _place(np.asarray(alpha / rank, np.float32), sharding_of("scale"))
    return lora
