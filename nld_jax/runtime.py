"""How a program runs, as one static argument: which kernels, and on which mesh with which rules.

Every jitted forward, decode step and train step takes a :class:`Runtime` next to the config.
It is frozen and hashable, so it keys the compiled program, and it is explicit: nothing is read
from a context (no ``with mesh:``, no context variable), so the same function traced with another
mesh or other rules is another program, never a silent reuse.

* ``implementation``: the attention and greedy-head implementation (``"auto"``, ``"xla"`` or a
  Pallas kernel name; :mod:`pallas_kernels.policy` decides what ``"auto"`` means).
* ``mesh`` / ``rules``: under a mesh, :meth:`constrain` pins activations to the sharding their
  logical axes imply at each contraction, and :meth:`shard_kernel` runs a kernel (which the
  partitioner cannot split) on local shards inside ``jax.shard_map``. Without a mesh both are
  no-ops, and the program is the plain single-device one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nld_jax.partitioning import DEFAULT_RULES, ShardingRules, partition_spec

__all__ = ["Runtime", "DEFAULT_RUNTIME"]


@dataclasses.dataclass(frozen=True)
class Runtime:
    implementation: str = "auto"
    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

    @property
    def sharded(self) -> bool:
        """Whether constraints and ``shard_map`` apply (a mesh of more than one device)."""
        return self.mesh is not None and self.mesh.size > 1

    def spec(self, axes: Sequence[str | None], shape: Sequence[int], what: str = "array") -> PartitionSpec:
        return partition_spec(axes, shape, self.mesh, self.rules, what=what)

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """Pin ``x`` to the sharding of its logical ``axes``; a no-op without a mesh.

        Only the layout changes (no arithmetic), so constrained and unconstrained programs agree
        up to the order of the partial sums that the partitioner's all-reduces add.
        """
        if not self.sharded:
            return x
        spec = self.spec(axes, x.shape, what=f"activation {tuple(axes)}")
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def shard_kernel(self, fn: Callable, in_axes: Sequence[Sequence[str | None] | None],
                     out_axes: Sequence[str | None] | list[Sequence[str | None]], *,
                     adjust: Callable | None = None) -> Callable:
        """``fn`` (a ``pallas_call`` the partitioner cannot split) run on local shards inside
        ``jax.shard_map`` over the mesh, each argument and output split by its logical axes;
        ``fn`` itself without a mesh.

        ``in_axes[i]`` is None for an argument passed whole (replicated); ``out_axes`` is one
        tuple of logical axes, or a list of them when ``fn`` returns a tuple. ``adjust(in_specs,
        out_specs)`` may tighten the derived specs to what the kernel needs.
        """
        if not self.sharded:
            return fn
        name = getattr(fn, "__name__", "kernel")

        def wrapped(*args):
            in_specs = [PartitionSpec() if ax is None else self.spec(ax, jax.numpy.shape(a), what=name)
                        for ax, a in zip(in_axes, args)]
            shapes = jax.eval_shape(fn, *args)  # global output shapes, for the divisibility checks
            if isinstance(out_axes, list):
                out_specs = tuple(self.spec(ax, s.shape, what=name) for ax, s in zip(out_axes, shapes))
            else:
                out_specs = self.spec(out_axes, shapes.shape, what=name)
            if adjust is not None:
                in_specs, out_specs = adjust(list(in_specs), out_specs)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                                 check_vma=False)(*args)

        wrapped.__name__ = f"sharded_{name}"
        return wrapped


DEFAULT_RUNTIME = Runtime()
