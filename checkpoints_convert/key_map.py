"""The HF <-> Orbax key map, derived from :mod:`nld_jax.params` (never a second table of keys).

Each HF tensor becomes one :class:`TensorRoute`: the exact HF key (layer index filled in), the
Orbax item and leaf it lands in, the layer slot for stacked leaves, both shapes and the two
layout transforms. The converter streams route by route; :class:`Ledger` makes sure every
route is used exactly once. All checks raise :class:`CheckpointError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

from nld_jax.checkpoint.hf import FLOAT_DTYPES, CheckpointError, check_tensor_set, key_listing
from nld_jax.checkpoint.orbax import LORA_ITEM, PARAMS_ITEM, check_item
from nld_jax.config import NLDConfig
from nld_jax.params import ParamSpec, lora_specs, param_specs

__all__ = ["TensorRoute", "LeafSpec", "KeyMap", "Ledger", "FLOAT_DTYPES"]



@dataclasses.dataclass(frozen=True)
class TensorRoute:
    """One HF tensor and the slot of our layout it fills."""

    hf_key: str
    item: str  # Orbax item: "params" or "lora"
    leaf: str  # dotted path inside the item tree ("layers.mlp.up_proj")
    layer: int | None  # index on the stacked L axis, None for unstacked leaves
    hf_shape: tuple[int, ...]
    slot_shape: tuple[int, ...]  # our shape of this one tensor (the leaf shape without L if stacked)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One array of an Orbax item: its full shape and whether axis 0 is the layer axis."""

    item: str
    leaf: str
    shape: tuple[int, ...]
    stacked: bool


class KeyMap:
    """Routes for one item ("params" or "lora"), in the model's canonical order."""

    def __init__(self, item: str, specs: Mapping[str, ParamSpec], num_layers: int):
        self.item = item
        self.leaves: dict[str, LeafSpec] = {}
        self.routes: list[TensorRoute] = []
        for leaf, spec in specs.items():
            self.leaves[leaf] = LeafSpec(item, leaf, tuple(spec.shape), spec.stacked)
            if spec.stacked:
                if spec.shape[0] != num_layers:
                    raise CheckpointError(f"{leaf}: stacked shape {spec.shape} does not start with L={num_layers}")
                for n in range(num_layers):
                    self.routes.append(TensorRoute(spec.hf_key.format(n=n), item, leaf, n, tuple(spec.hf_shape),
                                                   tuple(spec.shape[1:]), spec.to_ours, spec.to_hf))
            else:
                self.routes.append(TensorRoute(spec.hf_key, item, leaf, None, tuple(spec.hf_shape),
                                               tuple(spec.shape), spec.to_ours, spec.to_hf))
        self.by_key: dict[str, TensorRoute] = {}
        slots = set()
        for route in self.routes:
            # A key map that sends two slots to one tensor (or one slot to two tensors) would
            # silently drop data; refuse it when it is built, not when a checkpoint is read.
            if route.hf_key in self.by_key:
                raise CheckpointError(f"key map sends HF tensor {route.hf_key!r} to two slots")
            if (route.leaf, route.layer) in slots:
                raise CheckpointError(f"key map fills {route.leaf}[{route.layer}] twice")
            self.by_key[route.hf_key] = route
            slots.add((route.leaf, route.layer))

    @classmethod
    def for_params(cls, config: NLDConfig) -> "KeyMap":
        return cls(PARAMS_ITEM, param_specs(config), config.L)

    @classmethod
    def for_lora(cls, config: NLDConfig, rank: int) -> "KeyMap":
        return cls(LORA_ITEM, lora_specs(config, rank), config.L)

    def routes_of(self, leaf: str) -> list[TensorRoute]:
        return [r for r in self.routes if r.leaf == leaf]

    # ----------------------------------------------------------------------------------
    # Strict accounting of a source (HF side) and of a stored item (Orbax side)
    # ----------------------------------------------------------------------------------

    def check_source(self, keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]],
                     dtype_of: Callable[[str], np.dtype], where: str) -> None:
        """Every route present once with its shape and a floating dtype; nothing else present."""
        check_tensor_set(where, keys, shape_of, {r.hf_key: r.hf_shape for r in self.routes})
        for route in self.routes:
            dtype = np.dtype(dtype_of(route.hf_key))
            if dtype.name not in FLOAT_DTYPES:
                raise CheckpointError(f"{where}: tensor {route.hf_key!r} has dtype {dtype.name}; "
                                      f"weights must be one of {FLOAT_DTYPES}")

    def check_stored(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype],
                     where: str, extra_ok: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """The Orbax item holds exactly our leaves with our shapes (``extra_ok``: non-HF leaves)."""
        check_item(where, shapes, dtypes, {leaf: spec.shape for leaf, spec in self.leaves.items()}, extra_ok)

    def leaf_dtypes(self, dtype_of: Callable[[str], np.dtype], requested: np.dtype | None) -> dict[str, np.dtype]:
        """Stored dtype per leaf: ``requested``, or else the source dtype ("keep").

        The layers of one stacked leaf normally share a dtype; if they do not, "keep" promotes to
        the widest so no value is rounded (the round trip then changes that tensor's dtype).
        """
        out = {}
        for leaf in self.leaves:
            if requested is not None:
                out[leaf] = np.dtype(requested)
            else:
                out[leaf] = np.result_type(*{np.dtype(dtype_of(r.hf_key)) for r in self.routes_of(leaf)})
        return out


class Ledger:
    """Counts each HF tensor as it is converted: twice or never is an error naming the key."""

    def __init__(self, key_maps: Iterable[KeyMap]):
        self._expected = {r.hf_key for km in key_maps for r in km.routes}
        self._done: set[str] = set()

    def use(self, key: str) -> None:
        if key not in self._expected:
            raise CheckpointError(f"tensor {key!r} is not in the key map")
        if key in self._done:
            raise CheckpointError(f"tensor {key!r} used twice")
        self._done.add(key)

    @property
    def used(self) -> int:
        return len(self._done)

    def check_complete(self) -> None:
        left = sorted(self._expected - self._done)
        if left:
            raise CheckpointError(f"tensor(s) {key_listing(left)} were never converted")
