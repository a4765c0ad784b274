"""Weight-only quantization: int8 (every backend) and fp8 e4m3 (where the hardware has it), one
scale per output channel.

Which weights are quantized, and along which axes, is not a table here: it is the
``contracting`` field of each declaration in :mod:`nld_jax.params` (the axes a matmul sums
over, i.e. the ``in`` axis of NVIDIA's ``[out, in]`` matrix). A quantized weight is a
:class:`QuantizedArray`, a pytree node of two arrays (``w``: int8 or float8 in the weight's own
shape and layout, ``scale``: float32, the weight's shape without its contracting axes), so the
weights stay one pytree, shard by the same declarations, scan over layers and go through
``jax.jit`` like any other. Norms stay in the compute dtype; the draft LoRA stays float32.

Numerics (symmetric, per output channel, round to nearest even)::

    scale = max|w| over the contracting axes * (1 / qmax)          qmax: 127 (int8), 448 (e4m3)
    q     = clip(round(w * (1 / scale)), -qmax, qmax)                (0 where a channel is all zeros)
    y     = (x @ q.astype(compute dtype), accumulated in float32) * scale

Only multiplications and one same-shape reciprocal are used, because XLA rewrites a division by
a broadcast into a multiplication by a reciprocal: written that way, the host version
(:func:`quantize_rows`, numpy, what ``nld-convert --quantize`` runs slab by slab) and the device
version (:func:`quantize_array`, what ``load(quantize=)`` and :func:`quantize_params` run) give
bit-identical weights and scales.

The scale multiplies the matmul's *output*, so a backend only has to fuse the int8 -> compute
dtype convert into its matmul (XLA:GPU and XLA:TPU do). XLA:CPU does not: it writes the converted
weight to a temporary and then runs its float32 dot (see ``benchmarks/decode_bench.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["SCHEMES", "Scheme", "scheme", "QuantizedArray", "Quantization", "quantize_array", "quantize_rows",
           "quantize_placed", "dequantize", "einsum", "take", "is_quantized", "quantization_of", "scale_shape",
           "scale_sharding", "check_not_quantized", "contracting_axes", "quantized_leaves"]


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    storage: np.dtype  # what ``w`` holds
    qmax: float  # largest magnitude stored


SCHEMES = {"int8": Scheme("int8", np.dtype(np.int8), 127.0),
           "fp8": Scheme("fp8", np.dtype(ml_dtypes.float8_e4m3fn), 448.0)}


def scheme(name: Any) -> Scheme:
    """The scheme called ``name`` ("int8" or "fp8"), or a ValueError listing them."""
    if isinstance(name, Scheme):
        return name
    if not isinstance(name, str) or name.lower() not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name.lower()]


def _scheme_of_storage(dtype) -> Scheme:
    for s in SCHEMES.values():
        if np.dtype(dtype) == s.storage:
            return s
    raise ValueError(f"no quantization scheme stores {np.dtype(dtype).name}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A weight stored as ``w`` (int8 / float8) times a per-output-channel ``scale`` (float32).

    ``contracting``: the axes of ``w`` a matmul sums over, as negative indices, so that they stay
    right when ``lax.scan`` slices the leading layer axis off both arrays. ``dtype``: the compute
    dtype the weight stands in for (what ``params["embed_tokens"].dtype`` means to the model).
    """

    w: Any
    scale: Any
    contracting: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def ndim(self) -> int:
        return len(self.w.shape)

    @property
    def scheme(self) -> str:
        return _scheme_of_storage(self.w.dtype).name

    @property
    def T(self) -> "QuantizedArray":
        """The transposed matrix (the tied LM head is the embedding table, transposed)."""
        if self.ndim != 2:
            raise ValueError(f"QuantizedArray.T needs a matrix, got shape {self.shape}")
        return QuantizedArray(self.w.T, self.scale, tuple(-3 - a for a in self.contracting), self.dtype)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What a quantized weight tree looks like to the code that derives its shardings and shapes:
    the scheme and the compute dtype (hashable: part of a placement and of a program's key)."""

    scheme: str
    dtype: Any

    def __post_init__(self):
        object.__setattr__(self, "scheme", scheme(self.scheme).name)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def quantization_of(params) -> Quantization | None:
    """The quantization of a weight tree (None when no leaf is quantized)."""
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if isinstance(leaf, QuantizedArray):
            return Quantization(leaf.scheme, leaf.dtype)
    return None


def check_not_quantized(params, what: str = "this model") -> None:
    found = quantization_of(params)
    if found is not None:
        raise ValueError(f"{what} is already quantized ({found.scheme}); quantize the unquantized weights "
                         "(load the bf16 or float32 checkpoint) instead of quantizing twice")


def scale_shape(shape, contracting) -> tuple[int, ...]:
    """The scale's shape: the weight's without its contracting axes."""
    drop = {a % len(shape) for a in contracting}
    return tuple(n for i, n in enumerate(shape) if i not in drop)


def scale_sharding(sharding, contracting, ndim: int):
    """The scale's sharding, derived from the weight's: the same mesh axes on the output channels,
    none on the (dropped) contracting axes. None when it cannot be derived (let jit choose)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
        drop = {a % ndim for a in contracting}
        kept = [p for i, p in enumerate(spec) if i not in drop]
        while kept and kept[-1] is None:
            kept.pop()
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*kept))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


# --------------------------------------------------------------------------------------
# Quantizing
# --------------------------------------------------------------------------------------

def quantize_array(x: jax.Array, contracting: tuple[int, ...], scheme_name: str = "int8", dtype=None) -> QuantizedArray:
    """``x`` quantized per output channel (jnp; see the module docstring for the formula).
    ``dtype``: the compute dtype it stands in for (default ``x.dtype``)."""
    s = scheme(scheme_name)
    axes = tuple(a % x.ndim for a in contracting)
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=axes) * np.float32(1.0 / s.qmax)
    inverse = 1.0 / jnp.where(scale == 0, np.float32(1), scale)
    q = jnp.clip(xf * jnp.expand_dims(inverse, axes), -s.qmax, s.qmax)
    q = jnp.round(q) if s.name == "int8" else q
    return QuantizedArray(q.astype(s.storage), scale, tuple(a - x.ndim for a in axes),
                          np.dtype(x.dtype if dtype is None else dtype))


def quantize_rows(rows: np.ndarray, scheme_name: str = "int8", block_rows: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(q [out, in], scale [out] float32)`` of a host matrix in NVIDIA's ``[out, in]`` layout:
    one scale per row (output channel), bit-identical to :func:`quantize_array` on the same
    values. Works in blocks of rows, so the float32 temporaries stay small (the converter)."""
    s = scheme(scheme_name)
    if rows.ndim != 2:
        raise ValueError(f"quantize_rows needs an [out, in] matrix, got shape {rows.shape}")
    out, width = rows.shape
    block_rows = block_rows or max(1, (8 << 20) // max(4 * width, 1))
    q = np.empty(rows.shape, s.storage)
    scale = np.empty((out,), np.float32)
    for start in range(0, out, block_rows):
        xf = np.asarray(rows[start:start + block_rows], dtype=np.float32)
        sc = np.max(np.abs(xf), axis=1) * np.float32(1.0 / s.qmax) if width else np.zeros(len(xf), np.float32)
        inverse = np.float32(1) / np.where(sc == 0, np.float32(1), sc)
        with np.errstate(invalid="ignore"):  # a NaN/Inf row: its scale is non-finite, which callers check
            part = np.clip(xf * inverse[:, None], np.float32(-s.qmax), np.float32(s.qmax))
            q[start:start + block_rows] = np.rint(part) if s.name == "int8" else part
        scale[start:start + block_rows] = sc
    return q, scale


@functools.lru_cache(maxsize=64)
def _placed_quantizer(contracting, scheme_name, dtype, out_shardings):
    return jax.jit(functools.partial(quantize_array, contracting=contracting, scheme_name=scheme_name, dtype=dtype),
                   out_shardings=out_shardings)


def quantize_placed(x: jax.Array, contracting: tuple[int, ...], scheme_name: str, dtype=None) -> QuantizedArray:
    """:func:`quantize_array` of a placed array, compiled, the result on ``x``'s devices: ``w``
    in ``x``'s sharding, the scale in the sharding derived from it (:func:`scale_sharding`).
    Under a mesh the partitioner reduces each channel's max across the shards that hold it."""
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    sharding = getattr(x, "sharding", None)
    scale_sh = scale_sharding(sharding, contracting, x.ndim) if sharding is not None else None
    out = None if scale_sh is None else QuantizedArray(sharding, scale_sh, tuple(contracting), dtype)
    return _placed_quantizer(tuple(contracting), scheme(scheme_name).name, dtype, out)(x)


def dequantize(w) -> jax.Array:
    """A plain array in the compute dtype (plain arrays pass through)."""
    if not isinstance(w, QuantizedArray):
        return w
    scale = jnp.expand_dims(w.scale, tuple(a % w.ndim for a in w.contracting))
    return (w.w.astype(jnp.float32) * scale).astype(w.dtype)


# --------------------------------------------------------------------------------------
# Using quantized weights
# --------------------------------------------------------------------------------------

def _output_scale(spec: str, w: QuantizedArray) -> jax.Array:
    """The scale laid out to broadcast against ``einsum(spec, x, w)``'s output."""
    inputs, out = spec.replace(" ", "").split("->")
    w_letters = inputs.split(",")[1]
    if "." in w_letters or ("..." in out and not out.startswith("...")):
        raise ValueError(f"quantized einsum {spec!r}: the weight's axes must be named and a '...' lead the output")
    out = out.replace("...", "")
    drop = {a % len(w_letters) for a in w.contracting}
    free = [c for i, c in enumerate(w_letters) if i not in drop]
    if any(c not in out for c in free) or any(w_letters[i] in out for i in drop):
        raise ValueError(f"quantized einsum {spec!r}: the weight's contracting axes {sorted(drop)} must be exactly "
                         "the ones summed over")
    order = sorted(free, key=out.index)
    scale = jnp.transpose(w.scale, [free.index(c) for c in order]) if order != free else w.scale
    return scale.reshape([w.scale.shape[free.index(c)] if c in free else 1 for c in out])


def einsum(spec: str, x: jax.Array, w, *, preferred_element_type=None) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` for a plain or quantized weight ``w`` (the second operand).

    Quantized: the stored integers, converted to the compute dtype, go into the matmul with a
    float32 accumulator, and the per-channel scale multiplies the output; the result has
    ``preferred_element_type`` (default ``x.dtype``), rounded once."""
    if not isinstance(w, QuantizedArray):
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    y = jnp.einsum(spec, x, w.w.astype(x.dtype), preferred_element_type=jnp.float32)
    y = y * _output_scale(spec, w)
    return y.astype(preferred_element_type or x.dtype)


def take(table, ids: jax.Array) -> jax.Array:
    """Rows ``table[ids]`` (an embedding lookup), dequantized after the gather: only the rows
    read are converted."""
    if not isinstance(table, QuantizedArray):
        return jnp.take(table, ids, axis=0)
    if table.ndim != 2 or table.contracting != (-1,):
        raise ValueError(f"take needs a [V, D] table quantized per row, got {table.shape} contracting "
                         f"{table.contracting}")
    rows = jnp.take(table.w, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(table.scale, ids, axis=0)[..., None]).astype(table.dtype)


def contracting_axes(spec_axes: tuple[str, ...], contracting: tuple[str, ...]) -> tuple[int, ...]:
    """Negative indices of the logical ``contracting`` axes among ``spec_axes``."""
    return tuple(spec_axes.index(name) - len(spec_axes) for name in contracting)


def quantized_leaves(specs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{leaf: contracting axes (negative)}`` of every declaration that names contracting axes."""
    return {leaf: contracting_axes(s.axes, s.contracting) for leaf, s in specs.items() if s.contracting}
