"""``nld_jax.load``: a checkpoint directory (or the embedded default) -> :class:`NLDModel`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.checkpoint.hf import load_hf_lora, load_hf_params
from nld_jax.config import NLDConfig, load_hf_config
from nld_jax.kv_cache import KVCache
from nld_jax.params import init_lora, init_params
from nld_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = ["NLDModel", "load", "random_model", "DEFAULT_CHECKPOINT", "resolve_dtype"]

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


@dataclasses.dataclass
class NLDModel:
    """Weights (one pytree), the optional draft LoRA and tokenizer, and the config.

    ``params`` and ``lora`` are plain pytrees: pass them to the pure functions of
    :mod:`nld_jax.decode` inside your own ``jax.jit`` if the convenience API does not fit.
    """

    config: NLDConfig
    params: dict
    lora: dict | None = None
    tokenizer: Tokenizer | None = None
    path: str | None = None
    # Donated KV caches kept for reuse, keyed by (batch, slots): generation of a new batch of the
    # same shape reuses the buffer instead of allocating one.
    _cache_pool: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def dtype(self):
        return self.params["embed_tokens"].dtype

    def take_cache(self, batch: int, size: int) -> KVCache:
        cache = self._cache_pool.pop((batch, size), None)
        if cache is None or cache.k.is_deleted():
            cache = KVCache.empty(self.config, batch, size, self.dtype)
        return cache

    def return_cache(self, cache: KVCache) -> None:
        self._cache_pool.clear()  # keep one buffer: caches can be large
        self._cache_pool[(cache.batch, cache.size)] = cache


def is_converted_dir(path: str) -> bool:
    """Whether ``path`` is a checkpoint written by ``nld-convert`` (Orbax), not an HF directory."""
    return os.path.isdir(os.path.join(path, "params")) and os.path.exists(os.path.join(path, "nld_metadata.json"))


def load(path: str | os.PathLike | None = None, dtype="float32", *, load_lora: bool = True,
         load_tokenizer_files: bool = True, mesh=None, rules=None, shardings=None) -> NLDModel:
    """Load an NLD checkpoint directory (NVIDIA's HF layout) or the embedded default (``path=None``).

    ``dtype`` is the compute and storage dtype of the weights (bf16 on disk is upcast for
    float32). The draft LoRA of ``linear_spec_lora/`` stays float32 (as PEFT runs it).

    ``mesh`` (a ``jax.sharding.Mesh``, see :func:`nld_jax.sharding.make_mesh`) restores every
    weight straight into its sharding under ``rules`` (default :data:`nld_jax.sharding.DEFAULT_RULES`);
    ``shardings`` (a tree like the weights) overrides the derived ones. In a multi-process run
    each process copies only its own devices' slices.
    """
    path = DEFAULT_CHECKPOINT if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    dt = resolve_dtype(dtype)
    if is_converted_dir(path):
        return _load_orbax_sharded(path, dt, load_lora, load_tokenizer_files, mesh, rules, shardings)
    config = load_hf_config(path)
    place = lora_place = None
    if mesh is not None or shardings is not None:
        place, lora_place = _placers(config, mesh, rules, shardings)
    params = load_hf_params(path, config, dt, place=place)
    lora = load_hf_lora(path, config, place=lora_place) if load_lora else None
    if lora is not None and lora_place is not None:
        lora["scale"] = lora_place("lora.scale", np.asarray(lora["scale"]))
    tok = load_tokenizer(path, config.bos_token_id, config.eos_token_id) if load_tokenizer_files else None
    return NLDModel(config, params, lora, tok, path)


def _placers(config: NLDConfig, mesh, rules, shardings):
    """``place(path, host_array)`` hooks that put each weight (and LoRA leaf) into its sharding."""
    from nld_jax import sharding as sh
    from nld_jax.params import flatten_tree

    rules = rules or sh.DEFAULT_RULES
    flat = flatten_tree(shardings) if shardings is not None else flatten_tree(sh.param_shardings(config, mesh, rules))
    mesh = mesh or next(iter(flat.values())).mesh

    def place(path, host):
        return sh.place_global(host, flat[path])

    def lora_place(path, host):
        name = path.removeprefix("lora.")
        if name == "scale":
            return sh.place_global(host, sh.replicated(mesh))
        rank = host.shape[-1] if name == "A" else host.shape[1]  # A [L, H, Dh, r], B [L, r, D]
        return sh.place_global(host, sh.lora_shardings(config, mesh, rank, rules)[name])

    return place, lora_place


def _load_orbax_sharded(path, dt, load_lora, load_tokenizer_files, mesh, rules, shardings) -> NLDModel:
    from checkpoints_convert.orbax_io import load_orbax  # the converter's format

    if mesh is None and shardings is None:
        return load_orbax(path, dtype=dt, load_lora=load_lora, load_tokenizer_files=load_tokenizer_files)
    from nld_jax import sharding as sh

    rules = rules or sh.DEFAULT_RULES
    config = load_hf_config(path)
    shardings = shardings if shardings is not None else sh.param_shardings(config, mesh, rules)
    # Each device reads only its own chunks; the small LoRA comes replicated and is resharded below.
    model = load_orbax(path, dtype=dt, load_lora=load_lora, load_tokenizer_files=load_tokenizer_files,
                       shardings=shardings)
    if model.lora is not None:
        mesh = mesh or jax.tree.leaves(shardings)[0].mesh
        model.lora = sh.put_tree(model.lora, sh.lora_shardings(config, mesh, int(model.lora["A"].shape[-1]), rules))
    return model


def random_model(config: NLDConfig, seed: int = 0, dtype="float32", lora_rank: int | None = None,
                 std: float = 0.02) -> NLDModel:
    """A model with random weights (tests, benchmarks, memory plans)."""
    key = jax.random.PRNGKey(seed)
    params = init_params(config, key, resolve_dtype(dtype), std=std)
    lora = None
    if lora_rank:
        lora = init_lora(config, jax.random.fold_in(key, 1), lora_rank, alpha=4.0 * lora_rank, std=std, zero_b=False)
    return NLDModel(config, params, lora, None, None)
