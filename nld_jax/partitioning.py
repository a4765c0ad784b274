"""Logical axes -> shardings: the rules that place weights, LoRA, KV cache and activations on a mesh.

Every weight is declared once in :mod:`nld_jax.params` with its logical axes (``"embed"``,
``"q_heads"``, ...), and so are the LoRA's and the KV cache's. :class:`ShardingRules` maps each
logical axis to mesh axes, and :func:`partition_spec` turns (logical axes, shape, mesh) into a
``PartitionSpec``; the sharding of every array is derived that way, so a new weight gets its
sharding from its declaration alone.

The mesh has the three axes ``("data", "fsdp", "tensor")`` (:mod:`nld_jax.sharding` makes it):

* ``data``: batch parallelism (each shard decodes its own rows);
* ``fsdp``: the batch is split over it too, and the weights over their ``embed`` axis (gathered
  layer by layer inside the scan): meant for training, it also works for decoding;
* ``tensor``: Megatron-style tensor parallelism over query / KV heads, MLP width and vocabulary.

Divisibility. A logical axis whose size does not divide over its mesh axes keeps the mesh axes
that do divide and is replicated over the others, with a :class:`ShardingFallbackWarning` (or a
:class:`ShardingError` with ``ShardingRules(strict=True)``). The case that matters: KV heads that
do not divide the tensor axis (K=8 on tensor=16, the tiny model's K=2 on tensor=4) are
replicated over it; query heads stay sharded and the GQA grouping is re-derived by the
partitioner; the KV cache then costs its full per-row size on every tensor shard.

Quantized weights (:class:`~nld_jax.quant.QuantizedArray`): ``w`` takes the weight's own
sharding, and its ``scale`` the same mesh axes on the output channels (none on the contracting
axes it does not have: :func:`nld_jax.quant.scale_sharding`), so a scale always lives on the
devices of the channels it scales.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nld_jax import quant
from nld_jax.config import NLDConfig
from nld_jax.params import CACHE_AXES, lora_axes, param_specs, quantized_leaves, tree_from_flat

__all__ = [
    "MESH_AXES", "BATCH_AXES", "ShardingError", "ShardingFallbackWarning", "ShardingRules", "DEFAULT_RULES",
    "mesh_size", "batch_shards", "partition_spec", "named_sharding", "replicated", "param_shardings",
    "lora_shardings", "cache_shardings", "fallback_notes", "place_global", "put_tree", "shardings_of", "mesh_of", "flat_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class ShardingError(ValueError):
    """A mesh or rule set that cannot shard this model as asked."""


class ShardingFallbackWarning(UserWarning):
    """An axis was replicated because its size does not divide over its mesh axes."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """``logical axis -> mesh axes``, frozen and hashable (a static jit argument).

    Weight axes (declared in :mod:`nld_jax.params`): layers, vocab, embed, q_heads, kv_heads,
    head_dim, mlp, lora_rank. Activation and cache axes: batch, seq, cache_seq, act_embed,
    act_heads, act_kv_heads, act_mlp, act_vocab. ``None`` as a logical axis means replicated.
    """

    rules: tuple[tuple[str, tuple[str, ...]], ...] = (
        # weights
        ("layers", ()),
        ("vocab", ("tensor",)),
        ("embed", ("fsdp",)),  # FSDP: weights split on their model dimension
        ("q_heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("head_dim", ()),
        ("mlp", ("tensor",)),
        ("lora_rank", ()),
        # activations and KV cache
        ("batch", BATCH_AXES),
        ("seq", ()),
        ("cache_seq", ()),
        ("act_embed", ()),  # the residual stream is replicated over tensor (all-reduced after o_proj / down_proj)
        ("act_heads", ("tensor",)),
        ("act_kv_heads", ("tensor",)),
        ("act_mlp", ("tensor",)),
        ("act_vocab", ("tensor",)),
    )
    strict: bool = False  # raise instead of replicating an axis that does not divide

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        for name, axes in self.rules:
            if name == logical:
                return axes
        raise ShardingError(f"no sharding rule for logical axis {logical!r}; known: {[n for n, _ in self.rules]}")

    def replace(self, strict: bool | None = None, **mapping: str | Sequence[str] | None) -> "ShardingRules":
        """Override rules: ``rules.replace(vocab=None, embed=("fsdp", "data"))``."""
        def norm(v):
            return () if v is None else (v,) if isinstance(v, str) else tuple(v)
        unknown = set(mapping) - {n for n, _ in self.rules}
        new = tuple((n, norm(mapping[n]) if n in mapping else a) for n, a in self.rules)
        new += tuple((n, norm(v)) for n, v in mapping.items() if n in unknown)
        return ShardingRules(new, self.strict if strict is None else strict)


DEFAULT_RULES = ShardingRules()


def mesh_size(mesh, axes) -> int:
    shape = dict(mesh.shape)
    return int(np.prod([shape.get(a, 1) for a in axes], dtype=np.int64))


def batch_shards(mesh, rules: ShardingRules = DEFAULT_RULES) -> int:
    """How many ways the batch is split: batches that are a multiple of this shard fully."""
    return mesh_size(mesh, rules.mesh_axes("batch"))


def _fallback(message: str, rules: ShardingRules, notes: list[str] | None) -> None:
    if rules.strict:
        raise ShardingError(message)
    if notes is not None:
        notes.append(message)
    else:
        warnings.warn(message, ShardingFallbackWarning, stacklevel=3)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: ShardingRules = DEFAULT_RULES,
                   *, what: str = "array", notes: list[str] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with these logical ``axes`` and ``shape`` on ``mesh``.

    A mesh axis is used at most once per array (the first dimension that asks for it gets it),
    size-1 axes are dropped, Manual axes (inside ``shard_map``) are skipped, and an axis that
    does not divide the dimension is replicated (see the module docstring).
    """
    if len(axes) != len(shape):
        raise ShardingError(f"{what}: {len(axes)} logical axes {tuple(axes)} for a rank-{len(shape)} shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    used: set[str] = set()
    parts: list[Any] = []
    for dim, logical in zip(shape, axes):
        chosen: list[str] = []
        split = 1
        for axis in rules.mesh_axes(logical):
            n = sizes.get(axis, 1)
            if n == 1 or axis in used or axis in manual:
                continue
            if dim % (split * n):
                _fallback(f"{what}: {logical}={dim} does not divide over mesh axis {axis!r} (size {n}"
                          + (f", after {chosen}" if chosen else "") + f"); replicated over {axis!r}",
                          rules, notes)
                continue
            chosen.append(axis)
            split *= n
        used.update(chosen)
        parts.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while parts and parts[-1] is None:  # P('a', None) == P('a'); the short form reads better
        parts.pop()
    return PartitionSpec(*parts)


def named_sharding(axes, shape, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES, *, what="array",
                   notes=None) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules, what=what, notes=notes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(config: NLDConfig, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                    notes: list[str] | None = None, quantization: quant.Quantization | None = None) -> dict:
    """``NamedSharding`` tree with the structure of the weights, from their declarations (of a
    quantized tree under ``quantization``: ``QuantizedArray(w sharding, scale sharding)`` leaves)."""
    qleaves = quantized_leaves(config) if quantization is not None else {}
    flat = {}
    for path, spec in param_specs(config).items():
        sharding = named_sharding(spec.axes, spec.shape, mesh, rules, what=path, notes=notes)
        if path in qleaves:
            sharding = quant.QuantizedArray(sharding, quant.scale_sharding(sharding, qleaves[path], len(spec.shape)),
                                            qleaves[path], quantization.dtype)
        flat[path] = sharding
    return tree_from_flat(flat)


def lora_shardings(config: NLDConfig, mesh: Mesh, rank: int, rules: ShardingRules = DEFAULT_RULES,
                   notes: list[str] | None = None) -> dict:
    """``{"A", "B", "scale"}`` shardings of the draft LoRA, from its declarations."""
    return {name: named_sharding(axes, shape, mesh, rules, what="lora." + name, notes=notes)
            for name, (axes, shape) in lora_axes(config, rank).items()}


def cache_shardings(config: NLDConfig, mesh: Mesh, batch: int, size: int, rules: ShardingRules = DEFAULT_RULES,
                    notes: list[str] | None = None, quantized: bool = False) -> dict:
    """``{name: sharding}`` of the KV cache's leaves (``k``, ``v``, ``lengths`` and, for an int8
    cache, its scales); :meth:`nld_jax.kv_cache.KVCache.shardings` wraps them in a cache."""
    shape = (config.L, batch, size, config.K, config.Dh)
    shapes = {"k": shape, "v": shape, "lengths": (batch,)}
    if quantized:
        shapes.update(k_scale=shape[:-1], v_scale=shape[:-1])
    return {name: named_sharding(CACHE_AXES[name], shp, mesh, rules, what=f"cache.{name}", notes=notes)
            for name, shp in shapes.items()}


def fallback_notes(config: NLDConfig, mesh, rules: ShardingRules = DEFAULT_RULES, batch: int | None = None,
                   lora_rank: int | None = None) -> list[str]:
    """Every replication fallback that this mesh implies for the model (for plans and logs)."""
    notes: list[str] = []
    lax_rules = dataclasses.replace(rules, strict=False)
    param_shardings(config, mesh, lax_rules, notes)
    if lora_rank:
        lora_shardings(config, mesh, lora_rank, lax_rules, notes)
    if batch is not None:
        cache_shardings(config, mesh, batch, 1, lax_rules, notes)
    return list(dict.fromkeys(notes))


# --------------------------------------------------------------------------------------
# Host data -> global arrays (single- and multi-process)
# --------------------------------------------------------------------------------------

def place_global(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds in full.

    Each process copies only the slices of its own devices, so this works unchanged on one
    device, on a mesh of local devices and across processes (``jax.distributed``).
    """
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_tree(tree, shardings):
    """Place a pytree of arrays onto matching shardings (arrays already there are kept).

    Arrays already global on the target mesh are resharded by XLA; host or single-device
    arrays go through :func:`place_global`, which is what multi-process runs need. A quantized
    weight given its unquantized weight's sharding gets the scale's derived from it.
    """

    def put(x, sharding):
        if x is None:
            return None
        if isinstance(x, quant.QuantizedArray):
            if not isinstance(sharding, quant.QuantizedArray):
                sharding = quant.QuantizedArray(sharding, quant.scale_sharding(sharding, x.contracting, x.ndim),
                                                x.contracting, x.dtype)
            return quant.QuantizedArray(put(x.w, sharding.w), put(x.scale, sharding.scale), x.contracting, x.dtype)
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            return jax.device_put(x, sharding)  # device to device
        return place_global(np.asarray(jax.device_get(x)), sharding)

    return jax.tree.map(put, tree, shardings, is_leaf=quant.is_quantized)


def shardings_of(tree) -> Any:
    """The shardings of a tree of arrays (None for leaves that are not jax Arrays)."""
    return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, tree)


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays (or shardings) of ``tree`` live on; None when not on a NamedSharding mesh."""
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        sharding = leaf if isinstance(leaf, jax.sharding.Sharding) else getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
        return None
    return None



def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_shardings(shardings, leaves: Sequence[str], what: str) -> dict[str, jax.sharding.Sharding]:
    """``{dotted leaf path: sharding}`` of a caller's pytree of shardings (dict, FrozenDict...),
    which must have exactly the structure of ``leaves``."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    flat = {".".join(_key_name(k) for k in path): leaf for path, leaf in with_paths}
    if set(flat) != set(leaves):
        raise ShardingError(f"{what} must be a pytree with the structure of the weights {sorted(leaves)}; "
                            f"got {sorted(flat)}")
    for leaf, sharding in flat.items():
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ShardingError(f"{what}[{leaf!r}] is {type(sharding).__name__}, not a jax.sharding.Sharding")
    return flat
