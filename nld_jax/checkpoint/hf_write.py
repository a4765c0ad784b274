"""Writing NVIDIA's HF checkpoint layout from our weights (training output, exports).

The inverse of :mod:`nld_jax.checkpoint.hf`: keys, shapes and layouts come from the same
declarations in :mod:`nld_jax.params`, tensors are written bf16 by default (as NVIDIA ships
them), sharded with a ``model.safetensors.index.json`` when larger than ``max_shard_bytes``,
and the draft LoRA goes to ``linear_spec_lora/`` in PEFT's format.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nld_jax.checkpoint.hf import INDEX_FILE, LORA_DIR
from nld_jax.checkpoint.safetensors_io import write_safetensors
from nld_jax.config import NLDConfig, config_to_hf
from nld_jax.params import ParamSpec, flatten_tree, lora_specs, param_specs

__all__ = ["hf_tensors", "write_sharded", "save_hf_checkpoint", "save_hf_lora", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
_NP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def hf_tensors(specs: dict[str, ParamSpec], num_layers: int,
               get: Callable[[str], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_key, tensor)`` pairs in PyTorch layout; ``get(path)`` returns one of our parameters."""
    for path, spec in specs.items():
        value = get(path)
        if spec.stacked:
            for n in range(num_layers):
                yield spec.hf_key.format(n=n), spec.to_hf(np.asarray(value[n]))
        else:
            yield spec.hf_key, spec.to_hf(np.asarray(value))


def write_sharded(directory: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int,
                  metadata: dict | None = None, prefix: str = "model") -> list[str]:
    """Write tensors into ``{prefix}-0000i-of-0000n.safetensors`` shards (or one ``{prefix}.safetensors``)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        name = f"{prefix}.safetensors"
        write_safetensors(os.path.join(directory, name), shards[0], meta)
        return [name]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard, meta)
        weight_map.update({k: name for k in shard})
        names.append(name)
    total = sum(a.nbytes for shard in shards for a in shard.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def save_hf_lora(directory: str, config: NLDConfig, lora: dict, alpha: float | None = None) -> None:
    """The draft LoRA as a PEFT adapter (``adapter_config.json`` + float32 safetensors)."""
    rank = int(lora["A"].shape[-1])
    if alpha is None:
        alpha = float(np.asarray(lora["scale"])) * rank
    os.makedirs(directory, exist_ok=True)
    flat = {k: np.asarray(lora[k], np.float32) for k in ("A", "B")}
    tensors = dict(hf_tensors(lora_specs(config, rank), config.L, flat.__getitem__))
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "base_model_name_or_path": "..", "task_type": None, "r": rank,
                   "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": ["o_proj"], "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
                   "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}, f, indent=2)


def save_hf_checkpoint(directory: str, config: NLDConfig, params: dict, *, lora: dict | None = None,
                       dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30,
                       tokenizer_dir: str | None = None, extra_config: dict | None = None) -> None:
    """A complete NLD checkpoint directory that ``nld_jax.load`` and NVIDIA's code both read."""
    os.makedirs(directory, exist_ok=True)
    np_dtype = _NP_DTYPES[dtype]
    flat = flatten_tree(params)

    def get(path):
        return np.asarray(flat[path].astype(jnp.float32)).astype(np_dtype)

    write_sharded(directory, hf_tensors(param_specs(config), config.L, get), max_shard_bytes)
    hf = {**config_to_hf(config), "torch_dtype": dtype, **(extra_config or {})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(directory, name)):
                shutil.copy2(src, os.path.join(directory, name))
    if lora is not None:
        save_hf_lora(os.path.join(directory, LORA_DIR), config, lora)
