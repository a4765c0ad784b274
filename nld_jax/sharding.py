"""Device meshes and the logical-axis rules that shard weights, KV cache and activations.

Every parameter is declared once in :mod:`nld_jax.params` with its logical axes (``"embed"``,
``"q_heads"``, ...). :class:`ShardingRules` maps each logical axis to mesh axes, and
:func:`partition_spec` turns (logical axes, shape, mesh) into a ``PartitionSpec``; the sharding
of every weight, of the LoRA, of the KV cache and of the activations is derived that way, so a
new weight gets its sharding from its declaration alone.

The mesh always has the three axes ``("data", "fsdp", "tensor")`` (size 1 where unused):

* ``data``: batch parallelism (each shard decodes its own rows).
* ``fsdp``: the batch is split over it too, and the weights are split over their ``embed``
  axis (gathered layer by layer inside the scan). Meant for training; it also works for
  decoding, where it trades all-gathers for memory.
* ``tensor``: Megatron-style tensor parallelism: query / KV heads, MLP width and vocabulary.
  It is the innermost axis, so that its collectives stay between neighbouring devices.

The mesh axes are ``AxisType.Auto``: shardings are explicit at the jit boundary (weights, cache,
inputs, outputs) and pinned by :func:`constrain` at the model's contractions, and XLA's
partitioner propagates them through the decode loops. Explicit (sharding-in-types) axes would
instead require an annotation on every gather and scatter of the mode-agnostic decode loops.

Divisibility. A logical axis whose size does not divide over its mesh axes keeps the mesh axes
that do divide and is replicated over the others, with a :class:`ShardingFallbackWarning` (or a
:class:`ShardingError` with ``ShardingRules(strict=True)``). The case that matters: KV heads
that do not divide the tensor axis (e.g. K=8 on tensor=16, or the tiny model's K=2 on tensor=4)
are replicated over it; query heads stay sharded, each shard keeps every KV head, and the GQA
grouping ``[K, G]`` is re-derived by the partitioner. The KV cache then costs its full
per-row size on every tensor shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nld_jax.config import NLDConfig
from nld_jax.kv_cache import KVCache
from nld_jax.params import lora_specs, param_specs, tree_from_flat

__all__ = [
    "MESH_AXES", "BATCH_AXES", "ShardingError", "ShardingFallbackWarning", "ShardingRules", "DEFAULT_RULES",
    "make_mesh", "parse_mesh", "mesh_from_spec", "mesh_size", "batch_shards",
    "partition_spec", "named_sharding", "replicated", "param_shardings", "lora_shardings",
    "cache_shardings", "CACHE_AXES", "fallback_notes",
    "logical_rules", "active_rules", "active_mesh", "constrain", "shard_kernel",
    "place_global", "put_tree",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axes of the KV cache's arrays (``nld_jax.kv_cache.KVCache``): [L, B, S, K, Dh] and [B].
CACHE_AXES = {"k": ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim"),
              "v": ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim"),
              "lengths": ("batch",)}


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


# --------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------

def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=4,tensor=2"`` -> ``{"data": 4, "fsdp": 1, "tensor": 2}``; ``-1`` = the remaining devices."""
    if spec is None or spec == "":
        return {"data": -1, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                raise ShardingError(f"mesh spec {spec!r}: expected name=size pairs such as 'data=4,tensor=2'")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise ShardingError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"unknown mesh axis/axes {unknown}; the axes are {MESH_AXES}")
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    if sum(s == -1 for s in sizes.values()) > 1:
        raise ShardingError("at most one mesh axis may be -1 (the remaining devices)")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ShardingError(f"mesh axis sizes must be positive (or -1), got {sizes}")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh with Auto axes (see the module docstring).

    One size may be -1: it takes the devices the others leave. The mesh uses the first
    ``data * fsdp * tensor`` of ``devices`` (default: all devices of all processes), so a
    smaller mesh than the machine is allowed (tests, plans).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if len(devices) % known:
                raise ShardingError(f"{len(devices)} devices do not split into {axis}=-1 with the other axes "
                                    f"taking {known}")
            sizes[axis] = len(devices) // known
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ShardingError(f"mesh {_fmt(sizes)} needs {need} devices, only {len(devices)} are available"
                            + ("; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                               f"{need} before JAX starts" if devices[0].platform == "cpu" else ""))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:need])


def mesh_from_spec(spec: str | Mapping[str, int] | None, devices=None) -> Mesh:
    return make_mesh(**parse_mesh(spec), devices=devices)


def _fmt(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items())


def mesh_size(mesh, axes: Iterable[str]) -> int:
    shape = dict(mesh.shape)
    return math.prod(shape.get(a, 1) for a in axes)


def batch_shards(mesh, rules: ShardingRules = DEFAULT_RULES) -> int:
    """How many ways the batch is split: batches that are a multiple of this shard fully."""
    return mesh_size(mesh, rules.mesh_axes("batch"))


# --------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# --------------------------------------------------------------------------------------

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
                    notes: list[str] | None = None) -> dict:
    """``NamedSharding`` tree with the structure of the weights, from their declarations."""
    return tree_from_flat({path: named_sharding(spec.axes, spec.shape, mesh, rules, what=path, notes=notes)
                           for path, spec in param_specs(config).items()})


def lora_shardings(config: NLDConfig, mesh: Mesh, rank: int, rules: ShardingRules = DEFAULT_RULES,
                   notes: list[str] | None = None) -> dict:
    """``{"A", "B", "scale"}`` shardings of the draft LoRA (``scale`` replicated)."""
    out = {name: named_sharding(spec.axes, spec.shape, mesh, rules, what="lora." + name, notes=notes)
           for name, spec in lora_specs(config, rank).items()}
    out["scale"] = replicated(mesh)
    return out


def cache_shardings(config: NLDConfig, mesh: Mesh, batch: int, size: int, rules: ShardingRules = DEFAULT_RULES,
                    notes: list[str] | None = None) -> KVCache:
    """A :class:`KVCache` whose leaves are the shardings of ``k``, ``v`` and ``lengths``."""
    shape = (config.L, batch, size, config.K, config.Dh)
    return KVCache(named_sharding(CACHE_AXES["k"], shape, mesh, rules, what="cache.k", notes=notes),
                   named_sharding(CACHE_AXES["v"], shape, mesh, rules, what="cache.v", notes=notes),
                   named_sharding(CACHE_AXES["lengths"], (batch,), mesh, rules, what="cache.lengths", notes=notes))


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
# Inside jit: activation constraints and kernels under a mesh
# --------------------------------------------------------------------------------------

_ACTIVE_RULES: contextvars.ContextVar[ShardingRules | None] = contextvars.ContextVar("nld_sharding_rules",
                                                                                      default=None)


@contextlib.contextmanager
def logical_rules(rules: ShardingRules | None):
    """Rules that :func:`constrain` uses while tracing (default: :data:`DEFAULT_RULES`).

    Jitted callers should make ``rules`` a static argument and enter this context inside the
    traced function, so that the compiled program is keyed by them.
    """
    token = _ACTIVE_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> ShardingRules:
    return _ACTIVE_RULES.get() or DEFAULT_RULES


def active_mesh():
    """The mesh of ``jax.set_mesh`` while tracing, or None (no mesh, or a single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    # Inside a shard_map over every axis the values are already local: nothing to constrain.
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
        return None
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin ``x`` to the sharding of its logical ``axes`` under the active mesh; a no-op without one.

    Only the layout changes (no arithmetic), so constrained and unconstrained programs agree up
    to the order of the partial sums that the partitioner's all-reduces add.
    """
    mesh = active_mesh()
    rules = active_rules()
    # A caller's mesh with other axis names (its own rules) is left to the caller.
    if mesh is None or not set(mesh.axis_names) & {a for _, axes_ in rules.rules for a in axes_}:
        return x
    spec = partition_spec(axes, x.shape, mesh, rules, what=f"activation {tuple(axes)}")
    if mesh.explicit_axes:  # a caller's Explicit mesh (e.g. training): sharding lives in the types
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def shard_kernel(fn: Callable, in_axes: Sequence[Sequence[str | None] | None],
                 out_axes: Sequence[str | None] | list[Sequence[str | None]], *,
                 adjust: Callable | None = None) -> Callable:
    """Wrap a kernel (a ``pallas_call`` the partitioner cannot split) in ``jax.shard_map`` over the
    active mesh, each argument and output split by its logical axes; without a mesh, ``fn``.

    ``in_axes[i]`` is None for an argument passed whole (replicated); ``out_axes`` is one tuple
    of logical axes, or a list of them when ``fn`` returns a tuple. ``adjust(in_specs,
    out_specs)`` may tighten the derived specs to what the kernel needs. The kernel then runs
    on local shards exactly as it runs on one device.
    """

    def wrapped(*args):
        mesh = active_mesh()
        if mesh is None:
            return fn(*args)
        rules = active_rules()
        name = getattr(fn, "__name__", "kernel")
        in_specs = [PartitionSpec() if ax is None else partition_spec(ax, a.shape, mesh, rules, what=name)
                    for ax, a in zip(in_axes, args)]
        shapes = jax.eval_shape(fn, *args)  # global output shapes, for the divisibility checks
        if isinstance(out_axes, list):
            out_specs = tuple(partition_spec(ax, s.shape, mesh, rules, what=name) for ax, s in zip(out_axes, shapes))
        else:
            out_specs = partition_spec(out_axes, shapes.shape, mesh, rules, what=name)
        if adjust is not None:
            in_specs, out_specs = adjust(list(in_specs), out_specs)
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)(*args)

    wrapped.__name__ = f"sharded_{getattr(fn, '__name__', 'kernel')}"
    return wrapped


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
    """Place a pytree of arrays onto matching shardings.

    Arrays already global on the target mesh are resharded by XLA; host or single-device
    arrays go through :func:`place_global`, which is what multi-process runs need.
    """

    def put(x, sharding):
        if x is None:
            return None
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            return jax.device_put(x, sharding)  # device to device
        return place_global(np.asarray(jax.device_get(x)), sharding)

    return jax.tree.map(put, tree, shardings)
