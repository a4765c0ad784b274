"""Device meshes for nld-jax, and placing a loaded model on one.

The mesh always has the three axes ``("data", "fsdp", "tensor")`` (size 1 where unused); what
each axis shards, and the rules that map every weight's, cache's and activation's logical axes
onto it, are :mod:`nld_jax.partitioning`'s. The axes are ``AxisType.Auto``: shardings are
explicit at the jit boundary (weights, cache, inputs, outputs) and pinned by
:meth:`nld_jax.runtime.Runtime.constrain` at the model's contractions, and XLA's partitioner
propagates them through the decode loops.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from nld_jax.loading import NLDModel
from nld_jax.partitioning import (DEFAULT_RULES, MESH_AXES, ShardingError, ShardingRules, lora_shardings,
                                  param_shardings, put_tree)

__all__ = ["make_mesh", "parse_mesh", "mesh_from_spec", "shard_model"]


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
                size = int(value)
            except ValueError:
                raise ShardingError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
            if name.strip() in items:
                raise ShardingError(f"mesh spec {spec!r}: axis {name.strip()!r} is given twice")
            items[name.strip()] = size
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


def shard_model(model: NLDModel, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NLDModel:
    """A copy of ``model`` whose weights (and LoRA) are placed by the rules on ``mesh``."""
    params = put_tree(model.params, param_shardings(model.config, mesh, rules))
    lora = model.lora
    if lora is not None:
        lora = put_tree(lora, lora_shardings(model.config, mesh, int(lora["A"].shape[-1]), rules))
    return dataclasses.replace(model, params=params, lora=lora)
