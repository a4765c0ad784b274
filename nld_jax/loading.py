"""``nld_jax.load``: a checkpoint directory (or the embedded default) -> :class:`NLDModel`.

One walk for both formats: read ``config.json`` once, derive every weight's sharding once
(from the parameter declarations and the mesh, or the caller's tree, or the first device),
then restore the tensors from NVIDIA's safetensors (:mod:`nld_jax.checkpoint.hf`) or from a
converted Orbax checkpoint (:mod:`nld_jax.checkpoint.orbax`) straight into those shardings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import partitioning
from nld_jax.checkpoint import hf, orbax
from nld_jax.checkpoint.directory import GenerationDefaults, load_hf_config, read_generation_defaults
from nld_jax.config import NLDConfig
from nld_jax.params import flatten_tree, init_lora, init_params, param_specs
from nld_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = ["NLDModel", "load", "random_model", "DEFAULT_CHECKPOINT", "resolve_dtype", "stored_dtype"]

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "default-model")

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}") from None
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return jnp.dtype(dtype).type


@dataclasses.dataclass(frozen=True)
class NLDModel:
    """Weights (one pytree), the optional draft LoRA and tokenizer, and the config. Frozen: a
    changed model is a new one (``dataclasses.replace``).

    ``params`` and ``lora`` are plain pytrees: pass them to the pure functions of
    :mod:`nld_jax.decode` inside your own ``jax.jit`` if the convenience API does not fit.
    """

    config: NLDConfig
    params: dict
    lora: dict | None = None
    tokenizer: Tokenizer | None = None
    path: str | None = None
    generation: GenerationDefaults = GenerationDefaults()  # the checkpoint's generation_config.json

    @property
    def dtype(self):
        return self.params["embed_tokens"].dtype


def stored_dtype(path: str | os.PathLike) -> str:
    """The dtype a checkpoint stores its weights in, as the model dtype to load them in
    (``"bfloat16"``, else ``"float32"``: float16 and float64 weights run in float32)."""
    path = os.fspath(path)
    if orbax.is_converted_dir(path):
        leaves = orbax.open_item(os.path.join(path, orbax.PARAMS_ITEM))
        if "embed_tokens" not in leaves:
            raise hf.CheckpointError(f"{path}: no array 'embed_tokens' in {orbax.PARAMS_ITEM}/")
        dtype = np.dtype(leaves["embed_tokens"].dtype.numpy_dtype)
    else:
        ckpt = hf.HFCheckpoint(path)
        key = "encoder.embed_tokens.weight"
        if key not in ckpt:
            raise hf.CheckpointError(f"{path}: missing tensor {key!r}")
        dtype = np.dtype(ckpt.dtype(key))
    return "bfloat16" if dtype.name == "bfloat16" else "float32"


def _sharding_plan(config: NLDConfig, mesh, rules, shardings):
    """``(sharding_of(leaf), lora_sharding_of(rank) -> (leaf -> sharding))``, derived once: from
    the caller's tree, else from the declarations on ``mesh``, else the first device."""
    rules = rules or partitioning.DEFAULT_RULES
    if shardings is not None:
        flat = partitioning.flat_shardings(shardings, list(param_specs(config)), "shardings")
        if mesh is None:
            mesh = partitioning.mesh_of(list(flat.values()))
    elif mesh is not None:
        flat = flatten_tree(partitioning.param_shardings(config, mesh, rules))
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return (lambda leaf: one), (lambda rank: lambda leaf: one)
    if mesh is None:  # the caller's shardings name no mesh (single devices): the LoRA goes with the embedding
        return flat.__getitem__, (lambda rank: lambda leaf: flat["embed_tokens"])
    return flat.__getitem__, (lambda rank: partitioning.lora_shardings(config, mesh, rank, rules).__getitem__)


def load(path: str | os.PathLike | None = None, dtype="float32", *, load_lora: bool = True,
         load_tokenizer_files: bool = True, mesh=None, rules=None, shardings=None) -> NLDModel:
    """Load an NLD checkpoint directory (NVIDIA's HF layout, or one converted by ``nld-convert``)
    or the embedded default (``path=None``).

    ``dtype`` is the compute and storage dtype of the weights (bf16 on disk is upcast for
    float32; None keeps the stored dtype). The draft LoRA of ``linear_spec_lora/`` stays float32
    (as PEFT runs it).

    ``mesh`` (a ``jax.sharding.Mesh``, see :func:`nld_jax.sharding.make_mesh`) restores every
    weight straight into its sharding under ``rules`` (default :data:`nld_jax.partitioning.DEFAULT_RULES`),
    and the LoRA into its own; ``shardings`` (a tree like the weights) overrides the derived
    ones. In a multi-process run each process reads only its own devices' slices.
    """
    path = DEFAULT_CHECKPOINT if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    dt = resolve_dtype(stored_dtype(path) if dtype is None else dtype)
    config = load_hf_config(path)
    param_sharding_of, lora_sharding_of = _sharding_plan(config, mesh, rules, shardings)
    converted = orbax.is_converted_dir(path)
    if converted:
        orbax.read_metadata(path)  # format and version
        params = orbax.read_params(path, config, dt, param_sharding_of)
        rank = orbax.lora_rank(path) if load_lora else None
        lora = orbax.read_lora(path, config, lora_sharding_of(rank)) if rank else None
    else:
        params = hf.read_hf_params(path, config, dt, param_sharding_of)
        rank = hf.hf_lora_rank(path) if load_lora else None
        lora = hf.read_hf_lora(path, config, lora_sharding_of(rank)) if rank else None
    tok = load_tokenizer(path, config.bos_token_id, config.eos_token_id) if load_tokenizer_files else None
    return NLDModel(config, params, lora, tok, path, read_generation_defaults(path))


def random_model(config: NLDConfig, seed: int = 0, dtype="float32", lora_rank: int | None = None,
                 std: float = 0.02) -> NLDModel:
    """A model with random weights (tests, benchmarks, memory plans)."""
    key = jax.random.PRNGKey(seed)
    params = init_params(config, key, resolve_dtype(dtype), std=std)
    lora = None
    if lora_rank:
        lora = init_lora(config, jax.random.fold_in(key, 1), lora_rank, alpha=4.0 * lora_rank, std=std, zero_b=False)
    return NLDModel(config, params, lora, None, None)
