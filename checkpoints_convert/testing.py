"""Small HF checkpoints in NVIDIA's format, built from a params tree (tests and examples).

Everything here except :func:`write_large_random_checkpoint` holds whole shards in memory: it
is for tiny models. That one streams tensor by tensor, for benchmarks at real layer sizes.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from nld_jax.checkpoint.hf import INDEX_FILE, LORA_DIR, expand_keys
from nld_jax.checkpoint import hf_write
from nld_jax.checkpoint.hf_write import peft_adapter_config, write_index
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from nld_jax.config import NLDConfig, config_to_hf
from nld_jax.params import flatten_tree, init_lora, init_params, lora_specs, param_specs

__all__ = ["hf_tensors", "write_hf_checkpoint", "random_hf_checkpoint", "write_large_random_checkpoint",
           "hf_dir_tensors"]


def hf_tensors(config: NLDConfig, params: dict, dtype=None) -> dict[str, np.ndarray]:
    """``{HF key: array}`` in NVIDIA's layout and canonical order."""
    flat = flatten_tree(params)
    return {key: np.ascontiguousarray(t if dtype is None else t.astype(dtype))
            for key, t in hf_write.hf_tensors(param_specs(config), config.L, flat.__getitem__)}


def _lora_tensors(config: NLDConfig, lora: dict) -> dict[str, np.ndarray]:
    specs = lora_specs(config, int(lora["A"].shape[-1]))
    return {key: np.ascontiguousarray(t) for key, t in hf_write.hf_tensors(specs, config.L, lora.__getitem__)}


def write_hf_checkpoint(directory: str, config: NLDConfig, params: dict, *, lora: dict | None = None,
                        num_shards: int = 1, dtype=None, config_json: dict | None = None,
                        tensors: dict[str, np.ndarray] | None = None) -> str:
    """Write ``params`` (our layout) as an HF directory: ``num_shards`` files (+ index when > 1),
    ``config.json`` and, with ``lora``, ``linear_spec_lora/``. ``tensors`` overrides the tensor
    dict (tests use it to plant malformed checkpoints)."""
    os.makedirs(directory, exist_ok=True)
    tensors = tensors if tensors is not None else hf_tensors(config, params, dtype)
    keys = list(tensors)
    if num_shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(np.arange(len(keys)), num_shards)):
            name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            write_safetensors(os.path.join(directory, name), {keys[j]: tensors[keys[j]] for j in part},
                              {"format": "pt"})
            weight_map.update({keys[j]: name for j in part})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_json or config_to_hf(config), f, indent=2)
    if lora is not None:
        lora_dir = os.path.join(directory, LORA_DIR)
        os.makedirs(lora_dir, exist_ok=True)
        rank = int(lora["A"].shape[-1])
        write_safetensors(os.path.join(lora_dir, "adapter_model.safetensors"), _lora_tensors(config, lora),
                          {"format": "pt"})
        with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
            json.dump(peft_adapter_config(rank, float(lora["scale"]) * rank), f, indent=2)
    return directory


def random_hf_checkpoint(directory: str, config: NLDConfig, *, seed: int = 0, num_shards: int = 1,
                         dtype="bfloat16", lora_rank: int | None = None) -> str:
    """A random checkpoint (``init_params``) of ``config`` in NVIDIA's format."""
    import jax.numpy as jnp

    key = jax.random.PRNGKey(seed)
    params = init_params(config, key, jnp.dtype(dtype), std=0.05)
    lora = None
    if lora_rank:
        lora = init_lora(config, jax.random.fold_in(key, 1), lora_rank, alpha=2.0 * lora_rank, std=0.05,
                         zero_b=False)
    return write_hf_checkpoint(directory, config, params, lora=lora, num_shards=num_shards)


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bfloat16 of magnitude ~0.01 made from random bits (10x faster than a normal draw)."""
    import ml_dtypes

    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)  # random sign and mantissa, 2^-7 scale


def write_large_random_checkpoint(directory: str, config: NLDConfig, *, max_shard_bytes: int,
                                  lora_rank: int | None = None, seed: int = 0) -> dict:
    """A random bf16 checkpoint in NVIDIA's format, written one tensor at a time (+ fp32 LoRA).

    Returns ``{"bytes": total tensor bytes, "largest": largest tensor bytes, "files": n}``.
    """
    from checkpoints_convert.safetensors_stream import SafetensorsStreamWriter, plan_shards

    import ml_dtypes

    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    shapes = {}
    for spec in param_specs(config).values():
        for key in expand_keys(spec, config.L):
            shapes[key] = spec.hf_shape
    bf16 = np.dtype(ml_dtypes.bfloat16)
    sizes = {k: int(np.prod(s)) * bf16.itemsize for k, s in shapes.items()}
    plan = plan_shards(sizes, max_shard_bytes)
    for name, keys in plan:
        writer = SafetensorsStreamWriter(os.path.join(directory, name), [(k, bf16, shapes[k]) for k in keys],
                                         {"format": "pt"})
        for key in keys:
            writer.write(key, _random_bf16(rng, shapes[key]))
        writer.close()
    write_index(directory, plan, sizes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    total = sum(sizes.values())
    if lora_rank:
        lora_dir = os.path.join(directory, LORA_DIR)
        os.makedirs(lora_dir)
        tensors = {}
        for spec in lora_specs(config, lora_rank).values():
            for n in range(config.L):
                tensors[spec.hf_key.format(n=n)] = (0.01 * rng.standard_normal(spec.hf_shape, np.float32))
        write_safetensors(os.path.join(lora_dir, "adapter_model.safetensors"), tensors, {"format": "pt"})
        with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
            json.dump(peft_adapter_config(lora_rank, 4 * lora_rank), f, indent=2)
        total += sum(t.nbytes for t in tensors.values())
    return {"bytes": total, "largest": max(sizes.values()), "files": len(plan)}


def hf_dir_tensors(directory) -> dict[tuple[str, str], tuple[str, tuple, bytes]]:
    """Every tensor of every safetensors file under ``directory``, keyed by (subdirectory, key):
    (dtype name, shape, raw bytes). Two directories hold the same weights iff these are equal."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".safetensors"):
                st = SafetensorsFile(os.path.join(root, name))
                rel = os.path.relpath(root, directory)
                for key in st.keys():
                    out[(rel, key)] = (st.dtype(key).name, st.shape(key), st.get(key).tobytes())
                st.close()
    return out
