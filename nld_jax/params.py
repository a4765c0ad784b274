"""The weights pytree, declared once.

Every parameter is declared in ``_DECLARATIONS`` with its shape, its logical axes (for the
sharding rules), how to initialise it and where it lives in NVIDIA's HF checkpoint (key and
layout transform). The abstract tree, random initialisation, the HF loader and the converter
are all derived from this one table, so adding or renaming a weight happens in one place.

Layout (HF-aligned names, ``encoder.`` prefix and ``.weight`` suffix dropped, layers stacked on
a leading ``L`` axis so that the layer loop is a ``lax.scan``; matrices stored ``[in, out]``)::

    embed_tokens                          [V, D]
    layers.input_layernorm                [L, D]
    layers.self_attn.q_proj               [L, D, H, Dh]
    layers.self_attn.k_proj               [L, D, K, Dh]
    layers.self_attn.v_proj               [L, D, K, Dh]
    layers.self_attn.o_proj               [L, H, Dh, D]
    layers.post_attention_layernorm       [L, D]
    layers.mlp.gate_proj                  [L, D, F]
    layers.mlp.up_proj                    [L, D, F]
    layers.mlp.down_proj                  [L, F, D]
    norm                                  [D]
    diffusion_head                        [D, V]

Each matrix also declares its ``contracting`` axes (the ``in`` axis of NVIDIA's ``[out, in]``):
what a matmul sums over, and so what weight-only quantization (:mod:`nld_jax.quant`) takes one
scale per output channel across. A quantized tree holds a :class:`~nld_jax.quant.QuantizedArray`
(int8 / float8 ``w`` + float32 ``scale``) at those leaves; :func:`abstract_params` and the
sharding rules derive its shapes and shardings from the same declarations.

The draft LoRA (``o_proj`` only) is its own small tree: ``A [L, H, Dh, r]``, ``B [L, r, D]``
and ``scale`` (a float32 scalar, alpha / r, from PEFT's ``adapter_config.json``).

The KV cache's logical axes live here too (:data:`CACHE_AXES`), so that every sharded array of a
decode program takes its sharding from a declaration in this one file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import quant
from nld_jax.config import NLDConfig

__all__ = [
    "ParamSpec",
    "param_specs",
    "lora_specs",
    "abstract_params",
    "init_params",
    "init_lora",
    "lora_axes",
    "CACHE_AXES",
    "tree_from_flat",
    "flatten_tree",
    "param_bytes",
    "quantized_leaves",
]

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: our shape and logical axes, its init, and its HF location.

    ``hf_key`` may contain ``{n}`` for the layer index; a spec with ``stacked=True`` gathers the
    ``L`` per-layer HF tensors into one array. ``to_ours`` maps one HF tensor (PyTorch ``[out, in]``)
    to our per-layer layout; ``to_hf`` is its inverse. ``contracting``: the logical axes a matmul
    with this weight sums over (HF's ``in``); empty for weights that are not matrices (norms).
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" | "ones"
    hf_key: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool = False
    contracting: tuple[str, ...] = ()


def _identity(x):
    return x


def _linear(out_shape: tuple[int, ...]):
    """HF ``[out, in]`` -> ours ``[in, *out_shape]`` (and back)."""

    def to_ours(w):
        return w.T.reshape(w.shape[1], *out_shape)

    def to_hf(w):
        return w.reshape(w.shape[0], -1).T

    return to_ours, to_hf


def _linear_in(in_shape: tuple[int, ...]):
    """HF ``[out, in]`` -> ours ``[*in_shape, out]`` (o_proj, lora_A: the input is split into heads)."""

    def to_ours(w):
        return w.T.reshape(*in_shape, w.shape[0])

    def to_hf(w):
        return w.reshape(-1, w.shape[-1]).T

    return to_ours, to_hf


def param_specs(config: NLDConfig) -> dict[str, ParamSpec]:
    """Flat ``{dotted path: ParamSpec}`` for the base model."""
    c = config
    L, D, F, H, K, Dh, V = c.L, c.D, c.F, c.H, c.K, c.Dh, c.V
    lay = "encoder.layers.{n}."
    q_t, kv_t = _linear((H, Dh)), _linear((K, Dh))
    o_t, mlp_t = _linear_in((H, Dh)), _linear((F,))
    down_t, head_t = _linear((D,)), _linear((V,))

    def layer(shape, axes, init, key, hf_shape, t=(_identity, _identity), contracting=()):
        return ParamSpec((L, *shape), ("layers", *axes), init, lay + key, hf_shape, t[0], t[1], True, contracting)

    specs = {
        # A lookup table, and the LM head when tied: one scale per vocabulary row.
        "embed_tokens": ParamSpec((V, D), ("vocab", "embed"), "normal", "encoder.embed_tokens.weight",
                                  (V, D), _identity, _identity, contracting=("embed",)),
        "layers.input_layernorm": layer((D,), ("embed",), "ones", "input_layernorm.weight", (D,)),
        "layers.self_attn.q_proj": layer((D, H, Dh), ("embed", "q_heads", "head_dim"), "normal",
                                         "self_attn.q_proj.weight", (H * Dh, D), q_t, ("embed",)),
        "layers.self_attn.k_proj": layer((D, K, Dh), ("embed", "kv_heads", "head_dim"), "normal",
                                         "self_attn.k_proj.weight", (K * Dh, D), kv_t, ("embed",)),
        "layers.self_attn.v_proj": layer((D, K, Dh), ("embed", "kv_heads", "head_dim"), "normal",
                                         "self_attn.v_proj.weight", (K * Dh, D), kv_t, ("embed",)),
        "layers.self_attn.o_proj": layer((H, Dh, D), ("q_heads", "head_dim", "embed"), "normal",
                                         "self_attn.o_proj.weight", (D, H * Dh), o_t, ("q_heads", "head_dim")),
        "layers.post_attention_layernorm": layer((D,), ("embed",), "ones",
                                                 "post_attention_layernorm.weight", (D,)),
        "layers.mlp.gate_proj": layer((D, F), ("embed", "mlp"), "normal", "mlp.gate_proj.weight", (F, D), mlp_t,
                                      ("embed",)),
        "layers.mlp.up_proj": layer((D, F), ("embed", "mlp"), "normal", "mlp.up_proj.weight", (F, D), mlp_t,
                                    ("embed",)),
        "layers.mlp.down_proj": layer((F, D), ("mlp", "embed"), "normal", "mlp.down_proj.weight", (D, F), down_t,
                                      ("mlp",)),
        "norm": ParamSpec((D,), ("embed",), "ones", "encoder.norm.weight", (D,), _identity, _identity),
    }
    if not c.tie_word_embeddings:
        specs["diffusion_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal", "diffusion_head.weight",
                                            (V, D), head_t[0], head_t[1], contracting=("embed",))
    return specs


def quantized_leaves(config: NLDConfig) -> dict[str, tuple[int, ...]]:
    """``{leaf: contracting axes as negative indices}`` of every weight a quantized tree quantizes."""
    return quant.quantized_leaves(param_specs(config))


LORA_PREFIX = "base_model.model."


def lora_specs(config: NLDConfig, rank: int) -> dict[str, ParamSpec]:
    """Flat specs of the PEFT draft LoRA on ``o_proj`` (NLD_SPEC.md section 2)."""
    L, D, H, Dh, r = config.L, config.D, config.H, config.Dh, rank
    a_t, b_t = _linear_in((H, Dh)), _linear((D,))
    key = LORA_PREFIX + "encoder.layers.{n}.self_attn.o_proj."
    return {
        "A": ParamSpec((L, H, Dh, r), ("layers", "q_heads", "head_dim", "lora_rank"), "normal",
                       key + "lora_A.weight", (r, H * Dh), a_t[0], a_t[1], True),
        "B": ParamSpec((L, r, D), ("layers", "lora_rank", "embed"), "zeros",
                       key + "lora_B.weight", (D, r), b_t[0], b_t[1], True),
    }


def lora_axes(config: NLDConfig, rank: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{leaf: (logical axes, shape)}`` of the whole LoRA tree, ``scale`` included (replicated)."""
    out = {name: (spec.axes, spec.shape) for name, spec in lora_specs(config, rank).items()}
    out["scale"] = ((), ())
    return out


# Logical axes of the KV cache's arrays (``nld_jax.kv_cache.KVCache``): [L, B, S, K, Dh], [B] and,
# for an int8 cache, the per-vector scales [L, B, S, K].
CACHE_AXES = {"k": ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim"),
              "v": ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim"),
              "lengths": ("batch",),
              "k_scale": ("layers", "batch", "cache_seq", "act_kv_heads"),
              "v_scale": ("layers", "batch", "cache_seq", "act_kv_heads")}


# --------------------------------------------------------------------------------------
# Tree helpers
# --------------------------------------------------------------------------------------

def tree_from_flat(flat: dict[str, Any]) -> Params:
    """``{"a.b": x}`` -> ``{"a": {"b": x}}``."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten_tree(tree: Params, prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`tree_from_flat`."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tree(value, path + "."))
        else:
            flat[path] = value
    return flat


def abstract_params(config: NLDConfig, dtype=jnp.float32, quantization: quant.Quantization | None = None) -> Params:
    """``jax.ShapeDtypeStruct`` tree (quantized leaves as :class:`~nld_jax.quant.QuantizedArray`
    of them under ``quantization``): no memory is allocated."""
    qleaves = quantized_leaves(config) if quantization is not None else {}
    flat = {}
    for path, spec in param_specs(config).items():
        if path in qleaves:
            storage = quant.scheme(quantization.scheme).storage
            flat[path] = quant.QuantizedArray(
                jax.ShapeDtypeStruct(spec.shape, storage),
                jax.ShapeDtypeStruct(quant.scale_shape(spec.shape, qleaves[path]), jnp.float32),
                qleaves[path], np.dtype(dtype))
        else:
            flat[path] = jax.ShapeDtypeStruct(spec.shape, dtype)
    return tree_from_flat(flat)


def _init_leaf(key, spec: ParamSpec, dtype, std: float):
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def init_params(config: NLDConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random weights (normal(0, std) matrices, unit norms): for tests and benchmarks."""
    specs = param_specs(config)
    keys = jax.random.split(key, len(specs))
    return tree_from_flat({p: _init_leaf(k, s, dtype, std) for k, (p, s) in zip(keys, specs.items())})


def init_lora(config: NLDConfig, key: jax.Array, rank: int, alpha: float, std: float = 0.02,
              zero_b: bool = True) -> Params:
    """A LoRA tree. PEFT initialises B to zero (a no-op adapter); tests want ``zero_b=False``."""
    specs = lora_specs(config, rank)
    ka, kb = jax.random.split(key)
    A = _init_leaf(ka, specs["A"], jnp.float32, std)
    B = jnp.zeros(specs["B"].shape, jnp.float32) if zero_b else _init_leaf(
        kb, dataclasses.replace(specs["B"], init="normal"), jnp.float32, std)
    return {"A": A, "B": B, "scale": jnp.asarray(alpha / rank, jnp.float32)}


def param_bytes(params: Params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
