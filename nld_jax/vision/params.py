"""The vision weights (Pixtral tower + Mistral3 projector), declared once with the text model's
:class:`~nld_jax.params.ParamSpec` machinery: shape, logical axes, init, HF key and layout.

Layout (layers stacked on ``Lv`` for a ``lax.scan``, matrices ``[in, out]``; ``C`` = 3 channels,
``P`` patch size, ``M`` spatial merge size, ``D`` the text hidden size)::

    tower.patch_conv                          [C, P, P, Dv]   (a conv with stride = kernel: a matmul)
    tower.ln_pre                              [Dv]
    tower.layers.attention_norm               [Lv, Dv]
    tower.layers.attention.{q,k,v}_proj       [Lv, Dv, Hv, Dhv]
    tower.layers.attention.o_proj             [Lv, Hv, Dhv, Dv]
    tower.layers.ffn_norm                     [Lv, Dv]
    tower.layers.feed_forward.{gate,up}_proj  [Lv, Dv, Fv]
    tower.layers.feed_forward.down_proj       [Lv, Fv, Dv]
    projector.norm                            [Dv]
    projector.merging_layer                   [Dv, M, M, Dv]  (unfold order: channel, then row, column)
    projector.linear_1                        [Dv, D]
    projector.linear_2                        [D, D]

HF keys are NVIDIA's (``encoder.vision_tower.*``, ``encoder.multi_modal_projector.*``) with
transformers' Pixtral / Mistral3 names below those prefixes. The sharding follows the text
model: heads and MLP over ``tensor``, the model dimension over ``fsdp``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import partitioning
from nld_jax.params import ParamSpec, _identity, _init_leaf, _linear, _linear_in, tree_from_flat
from nld_jax.vision.config import VisionConfig

__all__ = ["VISION_PREFIXES", "vision_specs", "init_vision_params", "vision_shardings"]

TOWER = "encoder.vision_tower."
PROJECTOR = "encoder.multi_modal_projector."
# Every checkpoint key under these prefixes belongs to the vision half (the text loader leaves them alone).
VISION_PREFIXES = (TOWER, PROJECTOR)


def _patch_conv():
    """HF conv weight ``[Dv, C, P, P]`` <-> ours ``[C, P, P, Dv]``."""
    return (lambda w: np.transpose(w, (1, 2, 3, 0))), (lambda w: np.transpose(w, (3, 0, 1, 2)))


def _merger(M: int):
    """HF ``[Dv, Dv * M * M]`` (input in unfold's order: channel, then window row, column) <-> ours
    ``[Dv, M, M, Dv]`` (input channel, row, column, output)."""

    def to_ours(w):
        return w.T.reshape(w.shape[1] // (M * M), M, M, w.shape[0])

    def to_hf(w):
        return w.reshape(-1, w.shape[-1]).T

    return to_ours, to_hf


def vision_specs(config: VisionConfig) -> dict[str, ParamSpec]:
    """Flat ``{dotted path: ParamSpec}`` of the vision tower and the projector."""
    c = config
    L, Dv, Fv, H, Dh, P, M, D = c.Lv, c.Dv, c.Fv, c.Hv, c.Dhv, c.patch_size, c.spatial_merge_size, c.text_hidden_size
    lay = TOWER + "transformer.layers.{n}."
    qkv_t, o_t, mlp_t, down_t = _linear((H, Dh)), _linear_in((H, Dh)), _linear((Fv,)), _linear((Dv,))

    def layer(shape, axes, init, key, hf_shape, t=(_identity, _identity), contracting=()):
        return ParamSpec((L, *shape), ("layers", *axes), init, lay + key, hf_shape, t[0], t[1], True, contracting)

    def matrix(shape, axes, key, hf_shape, t, contracting):
        return ParamSpec(shape, axes, "normal", key, hf_shape, t[0], t[1], contracting=contracting)

    def norm(key, dim):
        return ParamSpec((dim,), ("embed",), "ones", key, (dim,), _identity, _identity)

    specs = {
        "tower.patch_conv": matrix((3, P, P, Dv), (None, None, None, "embed"), TOWER + "patch_conv.weight",
                                   (Dv, 3, P, P), _patch_conv(), (None,)),
        "tower.ln_pre": norm(TOWER + "ln_pre.weight", Dv),
        "tower.layers.attention_norm": layer((Dv,), ("embed",), "ones", "attention_norm.weight", (Dv,)),
        "tower.layers.ffn_norm": layer((Dv,), ("embed",), "ones", "ffn_norm.weight", (Dv,)),
        "tower.layers.attention.o_proj": layer((H, Dh, Dv), ("q_heads", "head_dim", "embed"), "normal",
                                               "attention.o_proj.weight", (Dv, H * Dh), o_t, ("q_heads", "head_dim")),
        "tower.layers.feed_forward.down_proj": layer((Fv, Dv), ("mlp", "embed"), "normal",
                                                     "feed_forward.down_proj.weight", (Dv, Fv), down_t, ("mlp",)),
        "projector.norm": norm(PROJECTOR + "norm.weight", Dv),
        "projector.merging_layer": matrix((Dv, M, M, Dv), ("embed", None, None, None),
                                          PROJECTOR + "patch_merger.merging_layer.weight", (Dv, Dv * M * M),
                                          _merger(M), ("embed",)),
        "projector.linear_1": matrix((Dv, D), (None, "embed"), PROJECTOR + "linear_1.weight", (D, Dv),
                                     _linear((D,)), (None,)),
        "projector.linear_2": matrix((D, D), (None, "embed"), PROJECTOR + "linear_2.weight", (D, D),
                                     _linear((D,)), (None,)),
    }
    for name in ("q_proj", "k_proj", "v_proj"):
        specs[f"tower.layers.attention.{name}"] = layer(
            (Dv, H, Dh), ("embed", "q_heads", "head_dim"), "normal", f"attention.{name}.weight", (H * Dh, Dv),
            qkv_t, ("embed",))
    for name in ("gate_proj", "up_proj"):
        specs[f"tower.layers.feed_forward.{name}"] = layer(
            (Dv, Fv), ("embed", "mlp"), "normal", f"feed_forward.{name}.weight", (Fv, Dv), mlp_t, ("embed",))
    return specs


def init_vision_params(config: VisionConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random vision weights (tests)."""
    specs = vision_specs(config)
    keys = jax.random.split(key, len(specs))
    return tree_from_flat({p: _init_leaf(k, s, dtype, std) for k, (p, s) in zip(keys, specs.items())})


def vision_shardings(config: VisionConfig, mesh, rules=None) -> Callable[[str], jax.sharding.Sharding]:
    """``leaf path -> NamedSharding`` on ``mesh`` from the declarations (the text model's rules)."""
    rules = rules or partitioning.DEFAULT_RULES
    specs = vision_specs(config)
    return lambda path: partitioning.named_sharding(specs[path].axes, specs[path].shape, mesh, rules, what=path)
