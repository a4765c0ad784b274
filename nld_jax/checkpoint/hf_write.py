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

from nld_jax.checkpoint.hf import ADAPTER_CONFIG, ADAPTER_FILE, INDEX_FILE, LORA_DIR
from nld_jax.checkpoint.safetensors_io import write_safetensors
from nld_jax.config import NLDConfig, config_to_hf
from nld_jax.params import ParamSpec, flatten_tree, lora_specs, param_specs
from nld_jax.vision.config import VisionConfig, vision_config_to_hf
from nld_jax.vision.params import vision_specs

__all__ = ["hf_tensors", "shard_plan", "write_index", "write_sharded", "save_hf_checkpoint", "save_hf_lora", "peft_adapter_config", "TOKENIZER_FILES"]

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


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    """``[(file name, [keys])]``: greedy shards of at most ``max_shard_bytes`` in ``sizes`` order,
    named as transformers names them (one file: ``model.safetensors``)."""
    groups: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    n = len(groups)
    return [("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", keys)
            for i, keys in enumerate(groups)]


def write_index(directory: str, plan: list[tuple[str, list[str]]], sizes: dict[str, int]) -> None:
    """``model.safetensors.index.json``, as transformers writes it (weight map sorted by key)."""
    weight_map = {key: name for name, keys in plan for key in keys}
    index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def write_sharded(directory: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int,
                  metadata: dict | None = None) -> list[str]:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards with an index (or one
    ``model.safetensors``); returns the file names."""
    arrays = {key: np.ascontiguousarray(arr) for key, arr in tensors}
    sizes = {key: arr.nbytes for key, arr in arrays.items()}
    plan = shard_plan(sizes, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}
    for name, keys in plan:
        write_safetensors(os.path.join(directory, name), {k: arrays[k] for k in keys}, meta)
    if len(plan) > 1:
        write_index(directory, plan, sizes)
    return [name for name, _ in plan]


def save_hf_lora(directory: str, config: NLDConfig, lora: dict, alpha: float | None = None) -> None:
    """The draft LoRA as a PEFT adapter (``adapter_config.json`` + float32 safetensors)."""
    rank = int(lora["A"].shape[-1])
    if alpha is None:
        alpha = float(np.asarray(lora["scale"])) * rank
    os.makedirs(directory, exist_ok=True)
    flat = {k: np.asarray(lora[k], np.float32) for k in ("A", "B")}
    tensors = dict(hf_tensors(lora_specs(config, rank), config.L, flat.__getitem__))
    write_safetensors(os.path.join(directory, ADAPTER_FILE), tensors, {"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_adapter_config(rank, alpha), f, indent=2)


def peft_adapter_config(rank: int, alpha: float) -> dict:
    """PEFT's ``adapter_config.json`` for NLD's draft LoRA (rank ``rank`` on ``o_proj``)."""
    return {"peft_type": "LORA", "base_model_name_or_path": "..", "task_type": None, "r": int(rank),
            "lora_alpha": float(alpha), "lora_dropout": 0.0, "target_modules": ["o_proj"], "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


def save_hf_checkpoint(directory: str, config: NLDConfig, params: dict, *, lora: dict | None = None,
                       dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30,
                       tokenizer_dir: str | None = None, extra_config: dict | None = None,
                       vision: dict | None = None, vision_config: VisionConfig | None = None) -> None:
    """A complete NLD checkpoint directory that ``nld_jax.load`` and NVIDIA's code both read.

    With ``vision`` (``{"tower", "projector"}``) and its ``vision_config``: a vision-language
    checkpoint in NVIDIA's VLM layout (tower and projector tensors under ``encoder.vision_tower.``
    / ``encoder.multi_modal_projector.`` beside the text tensors, the VLM fields in config.json).
    """
    if (vision is None) != (vision_config is None):
        raise ValueError("give vision and vision_config together (a vision-language checkpoint) or neither")
    os.makedirs(directory, exist_ok=True)
    np_dtype = _NP_DTYPES[dtype]
    flat = flatten_tree(params)

    def get(path):
        return np.asarray(flat[path].astype(jnp.float32)).astype(np_dtype)

    tensors = hf_tensors(param_specs(config), config.L, get)
    if vision is not None:
        flat_vision = flatten_tree(vision)

        def get_vision(path):
            return np.asarray(flat_vision[path].astype(jnp.float32)).astype(np_dtype)

        text_tensors = tensors
        tensors = (t for part in (text_tensors, hf_tensors(vision_specs(vision_config), vision_config.Lv,
                                                           get_vision)) for t in part)
    write_sharded(directory, tensors, max_shard_bytes)
    hf = {**config_to_hf(config), **(vision_config_to_hf(vision_config) if vision is not None else {}),
          "torch_dtype": dtype, **(extra_config or {})}
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
