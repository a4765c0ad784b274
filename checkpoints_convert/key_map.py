"""The HF <-> Orbax key map, derived from :mod:`nld_jax.params` (never a second table of keys).

Each HF tensor becomes one :class:`TensorRoute`: the exact HF key (layer index filled in), the
Orbax item and leaf it lands in, the layer slot for stacked leaves, both shapes and the two
layout transforms. The converter streams route by route; :class:`Ledger` makes sure every
route is used exactly once. All checks raise :class:`CheckpointError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Mapping

import numpy as np

from nld_jax.checkpoint.hf import FLOAT_DTYPES, CheckpointError, check_layer_count, check_tensor_set, key_listing
from nld_jax import quant
from nld_jax.checkpoint.orbax import LORA_ITEM, PARAMS_ITEM, VISION_ITEM, check_item, quantized_item_shapes
from nld_jax.config import NLDConfig
from nld_jax.params import ParamSpec, lora_specs, param_specs
from nld_jax.vision.config import VisionConfig
from nld_jax.vision.params import vision_specs

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
    """One array of an Orbax item: its full shape, whether axis 0 is the layer axis, and the axes a
    matmul contracts (negative indices; empty for leaves that are never quantized)."""

    item: str
    leaf: str
    shape: tuple[int, ...]
    stacked: bool
    contracting: tuple[int, ...] = ()

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """The shape of its per-output-channel scale when quantized."""
        return quant.scale_shape(self.shape, self.contracting)


class KeyMap:
    """Routes for one item ("params", "lora" or a VLM's "vision"), in the model's canonical order.

    The routes (one per HF tensor: layers x leaves) are built on first use, after
    :meth:`check_source` has compared the layers config.json claims with those the source
    holds: a config that claims ten million layers is refused by that comparison, not by the
    memory a table of ten million layers' keys would take.
    """

    def __init__(self, item: str, specs: Mapping[str, ParamSpec], num_layers: int, config: NLDConfig | None = None):
        self.item = item
        self._config = config
        self.num_layers = num_layers
        self._specs = dict(specs)
        self.leaves: dict[str, LeafSpec] = {}
        for leaf, spec in self._specs.items():
            if spec.stacked and spec.shape[0] != num_layers:
                raise CheckpointError(f"{leaf}: stacked shape {spec.shape} does not start with L={num_layers}")
            self.leaves[leaf] = LeafSpec(item, leaf, tuple(spec.shape), spec.stacked,
                                         quant.contracting_axes(spec.axes, spec.contracting))

    @functools.cached_property
    def routes(self) -> list[TensorRoute]:
        routes, keys, slots = [], set(), set()
        for leaf, spec in self._specs.items():
            slot_shape = tuple(spec.shape[1:]) if spec.stacked else tuple(spec.shape)
            for n in range(self.num_layers) if spec.stacked else [None]:
                key = spec.hf_key if n is None else spec.hf_key.format(n=n)
                # A key map that sends two slots to one tensor (or one slot to two tensors) would
                # silently drop data; refuse it when it is built, not when a checkpoint is read.
                if key in keys:
                    raise CheckpointError(f"key map sends HF tensor {key!r} to two slots")
                if (leaf, n) in slots:
                    raise CheckpointError(f"key map fills {leaf}[{n}] twice")
                keys.add(key)
                slots.add((leaf, n))
                routes.append(TensorRoute(key, self.item, leaf, n, tuple(spec.hf_shape), slot_shape, spec.to_ours,
                                          spec.to_hf))
        return routes

    @functools.cached_property
    def by_key(self) -> dict[str, TensorRoute]:
        return {route.hf_key: route for route in self.routes}

    @classmethod
    def for_params(cls, config: NLDConfig) -> "KeyMap":
        return cls(PARAMS_ITEM, param_specs(config), config.L, config)

    @classmethod
    def for_lora(cls, config: NLDConfig, rank: int) -> "KeyMap":
        return cls(LORA_ITEM, lora_specs(config, rank), config.L)

    @classmethod
    def for_vision(cls, config: VisionConfig) -> "KeyMap":
        """A VLM's Pixtral tower and Mistral3 projector (never quantized)."""
        return cls(VISION_ITEM, vision_specs(config), config.Lv)

    def routes_of(self, leaf: str) -> list[TensorRoute]:
        return [r for r in self.routes if r.leaf == leaf]

    # ----------------------------------------------------------------------------------
    # Strict accounting of a source (HF side) and of a stored item (Orbax side)
    # ----------------------------------------------------------------------------------

    def check_source(self, keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]],
                     dtype_of: Callable[[str], np.dtype], where: str) -> None:
        """Every route present once with its shape and a floating dtype; nothing else present."""
        keys = list(keys)
        # Before anything of config.json's size is built (the routes, and the expected layer
        # list of check_layer_count): every layer needs a tensor, so a config claiming more
        # layers than the source has tensors is refused at once.
        if self.num_layers > len(keys):
            raise CheckpointError(f"{where}: config.json says {self.num_layers} layers; the safetensors hold "
                                  f"{len(keys)} tensors in all")
        check_layer_count(where, keys, self.num_layers)
        check_tensor_set(where, keys, shape_of, {r.hf_key: r.hf_shape for r in self.routes})
        for route in self.routes:
            dtype = np.dtype(dtype_of(route.hf_key))
            if dtype.name not in FLOAT_DTYPES:
                raise CheckpointError(f"{where}: tensor {route.hf_key!r} has dtype {dtype.name}; "
                                      f"weights must be one of {FLOAT_DTYPES}")

    def check_stored(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype],
                     where: str, extra_ok: Mapping[str, tuple[int, ...]] | None = None,
                     quantized: str | None = None) -> None:
        """The Orbax item holds exactly our leaves with our shapes (``extra_ok``: non-HF leaves;
        ``quantized``: the scheme of a quantized params item, ``<leaf>.w`` + ``<leaf>.scale``)."""
        if quantized is not None:
            expected, exact = quantized_item_shapes(self._config, quantized)
            check_item(where, shapes, dtypes, expected, extra_ok, exact_dtypes=exact)
            return
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
