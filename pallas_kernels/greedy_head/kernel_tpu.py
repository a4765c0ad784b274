"""Fused LM head + argmax + chosen-token probability: the Pallas TPU (Mosaic) kernel.

``logits = hidden @ weight`` is never written out. The vocabulary is walked in ``block_v``
tiles keeping, per row, a running max, the index where it was first reached, and a running
``sum(exp(logit - max))`` rescaled whenever the max grows (an online logsumexp). The
probability of the argmax is then ``1 / sum``.

Grid ``(row tiles, vocabulary splits, tiles per split)``: the splits are independent ranges of
the vocabulary (``parallel``, so megacore chips reduce two halves at once); each writes a tiny
``(max, argmax, sum)`` partial per row and :func:`merge_head_partials` folds them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import NEG_INF, cdiv, matmul_precision, poison_outputs, round_up

__all__ = ["TpuHeadSizes", "greedy_head_tpu", "merge_head_partials", "check_head_args"]

_INT_MAX = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class TpuHeadSizes:
    block_rows: int = 256  # hidden rows per tile (all of a verify block fits one tile)
    block_v: int = 512  # vocabulary columns per tile: a (D, block_v) weight tile, double-buffered
    num_splits: int = 2  # independent vocabulary ranges (megacore); merged afterwards

    def __post_init__(self):
        if self.block_rows < 8 or self.block_rows % 8:
            raise ValueError(f"block_rows must be a positive multiple of 8, got {self.block_rows}")
        if self.block_v < 128 or self.block_v % 128:
            raise ValueError(f"block_v must be a positive multiple of 128, got {self.block_v}")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")


def check_head_args(hidden, weight) -> tuple[int, int]:
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(f"need hidden [..., D] and weight [D, V]; got {hidden.shape}, {weight.shape}")
    return weight.shape[0], weight.shape[1]


def merge_head_partials(best, arg, total):
    """Fold per-split ``(max, argmax, sum exp(l - max))`` along axis 0 into (token, probability).

    The first split that reaches the global max wins, so ties resolve to the smallest token id
    (``jnp.argmax`` semantics). Splits that saw no column have ``max = -inf`` and weight 0."""
    top = jnp.max(best, axis=0)
    first = jnp.argmax(best == top[None], axis=0)
    token = jnp.take_along_axis(arg, first[None], axis=0)[0]
    w = jnp.where(best == NEG_INF, 0.0, jnp.exp(best - top[None]))
    return token.astype(jnp.int32), 1.0 / jnp.sum(w * total, axis=0)


def _kernel(h_ref, w_ref, *refs, V: int, bv: int, per_split: int, n_tiles: int):
    best_ref, arg_ref, sum_ref, m_sc, a_sc, l_sc = refs[-6:]  # aliased poison inputs may precede
    s, t = pl.program_id(1), pl.program_id(2)
    tile = s * per_split + t

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        a_sc[...] = jnp.zeros(a_sc.shape, jnp.int32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    @pl.when(tile < n_tiles)
    def _tile():
        h = h_ref[...]
        logits = lax.dot_general(h, w_ref[...], (((1,), (0,)), ((), ())), precision=matmul_precision(h.dtype),
                                 preferred_element_type=jnp.float32)
        col = tile * bv + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where(col < V, logits, NEG_INF)  # a ragged last tile reads padding
        tile_max = jnp.max(logits, axis=1, keepdims=True)
        tile_arg = jnp.min(jnp.where(logits == tile_max, col, _INT_MAX), axis=1, keepdims=True)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, tile_max)  # finite: every visited tile has a real column
        l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_new) + jnp.sum(jnp.exp(logits - m_new), axis=1, keepdims=True)
        # Strictly greater: tiles come in increasing column order, so the first maximum stays.
        a_sc[...] = jnp.where(tile_max > m_prev, tile_arg, a_sc[...])
        m_sc[...] = m_new

    @pl.when(t == per_split - 1)
    def _finish():
        best_ref[...] = m_sc[...]
        arg_ref[...] = a_sc[...]
        sum_ref[...] = l_sc[...]


def greedy_head_tpu(hidden, weight, *, sizes: TpuHeadSizes | None = None, interpret=False, poison: bool = False):
    """``(argmax [...] int32, softmax probability of it [...] float32)`` of ``hidden @ weight``."""
    D, V = check_head_args(hidden, weight)
    sizes = sizes or TpuHeadSizes()
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    bn = min(sizes.block_rows, round_up(N, 8))
    rows_padded = round_up(N, bn)
    h = jnp.pad(h, ((0, rows_padded - N), (0, 0))).astype(weight.dtype)
    bv = min(sizes.block_v, round_up(V, 128))
    n_tiles = cdiv(V, bv)
    splits = min(sizes.num_splits, n_tiles)
    per_split = cdiv(n_tiles, splits)

    def w_map(i, s, t):
        # Steps past the vocabulary (uneven splits) re-request the last tile: no new DMA.
        return 0, jnp.minimum(s * per_split + t, n_tiles - 1)

    part_spec = pl.BlockSpec((None, bn, 1), lambda i, s, t: (s, i, 0))
    part_shapes = [jax.ShapeDtypeStruct((splits, rows_padded, 1), dt) for dt in (jnp.float32, jnp.int32, jnp.float32)]
    in_specs = [pl.BlockSpec((bn, D), lambda i, s, t: (i, 0)), pl.BlockSpec((D, bv), w_map)]
    operands = [h, weight]
    aliases = poison_outputs(part_shapes, in_specs, operands) if poison else {}

    best, arg, total = pl.pallas_call(
        functools.partial(_kernel, V=V, bv=bv, per_split=per_split, n_tiles=n_tiles),
        grid=(rows_padded // bn, splits, per_split),
        in_specs=in_specs,
        out_specs=[part_spec] * 3,
        out_shape=part_shapes,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, 1), jnp.int32),
                        pltpu.VMEM((bn, 1), jnp.float32)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="nld_greedy_head",
    )(*operands)
    token, prob = merge_head_partials(best[..., 0], arg[..., 0], total[..., 0])
    return token[:N].reshape(lead), prob[:N].reshape(lead)
