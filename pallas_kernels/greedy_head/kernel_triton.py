"""Fused LM head + argmax + chosen-token probability: the Pallas Triton (GPU) kernel.

The head is a pure weight stream (``D x V`` = 1 GiB at the 8B shapes) against a handful of
rows, so the kernel is built to read every weight byte once with the whole GPU busy: the
vocabulary is cut into ``num_splits`` ranges (one program per range and row tile), each program
walks its range in ``block_v`` columns, accumulates ``hidden @ weight[:, cols]`` over ``block_d``
slices of D in float32, and folds the tile into a running (max, first argmax, sum of exp)
(the online logsumexp of ``kernel_tpu``). Only ``3 x splits x rows`` numbers reach HBM;
:func:`merge_head_partials` folds them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import NEG_INF, cdiv, matmul_precision, next_pow2, poison_outputs, round_up
from pallas_kernels.greedy_head.kernel_tpu import check_head_args, merge_head_partials

__all__ = ["TritonHeadSizes", "greedy_head_triton", "supported_triton_head"]

_INT_MAX = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class TritonHeadSizes:
    block_rows: int = 64  # rows per program (power of two >= 16; cut to the problem)
    block_v: int = 128  # vocabulary columns per step
    block_d: int = 64  # slice of D per dot (must divide D)
    num_splits: int | None = None  # vocabulary ranges; None: ~target_programs programs in all
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 528  # 4 x the 132 SMs of an H100: short ranges, balanced tails

    def __post_init__(self):
        for name in ("block_rows", "block_v", "block_d"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def supported_triton_head(model_dim: int) -> bool:
    return model_dim % 16 == 0


def _block_d(D: int, limit: int) -> int:
    bd = limit
    while D % bd:
        bd //= 2
    return bd


def _kernel(h_ref, w_ref, *refs, V: int, D: int, bv: int, bd: int, per_split: int, n_tiles: int):
    from jax.experimental.pallas import triton as pl_triton

    best_ref, arg_ref, sum_ref = refs[-3:]  # aliased poison inputs may precede them
    split = pl.program_id(1)
    bn = h_ref.shape[0]
    lo = jnp.minimum(split * per_split, n_tiles)
    hi = jnp.minimum(lo + per_split, n_tiles)

    def vocab_step(t, carry):
        m, arg, total = carry
        col = t * bv + jnp.arange(bv, dtype=jnp.int32)
        in_vocab = col < V

        def d_step(dd, acc):
            h = h_ref[:, pl.ds(dd * bd, bd)]
            w = pl_triton.load(w_ref.at[pl.ds(dd * bd, bd), pl.ds(t * bv, bv)], mask=in_vocab[None, :], other=0.0)
            return acc + lax.dot_general(h, w, (((1,), (0,)), ((), ())), precision=matmul_precision(h.dtype),
                                         preferred_element_type=jnp.float32)

        logits = lax.fori_loop(0, D // bd, d_step, jnp.zeros((bn, bv), jnp.float32))
        logits = jnp.where(in_vocab[None, :], logits, NEG_INF)
        tile_max = jnp.max(logits, axis=1)
        tile_arg = jnp.min(jnp.where(logits == tile_max[:, None], col[None, :], _INT_MAX), axis=1)
        m_new = jnp.maximum(m, tile_max)
        total = total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        # Strictly greater: tiles come in increasing column order, so the first maximum stays.
        return m_new, jnp.where(tile_max > m, tile_arg, arg), total

    init = (jnp.full((bn,), NEG_INF, jnp.float32), jnp.zeros((bn,), jnp.int32), jnp.zeros((bn,), jnp.float32))
    m, arg, total = lax.fori_loop(lo, hi, vocab_step, init)
    best_ref[...] = m
    arg_ref[...] = arg
    sum_ref[...] = total


def greedy_head_triton(hidden, weight, *, sizes: TritonHeadSizes | None = None, interpret=False,
                       poison: bool = False):
    """``(argmax [...] int32, softmax probability of it [...] float32)`` of ``hidden @ weight``."""
    from jax.experimental.pallas import triton as pl_triton  # deprecated backend: import on use

    D, V = check_head_args(hidden, weight)
    if not supported_triton_head(D):
        raise NotImplementedError(f"the Triton head kernel needs D % 16 == 0, got {D}")
    sizes = sizes or TritonHeadSizes()
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    bn = min(sizes.block_rows, max(16, next_pow2(N)))
    rows_padded = round_up(N, bn)
    h = jnp.pad(h, ((0, rows_padded - N), (0, 0))).astype(weight.dtype)
    n_rows = rows_padded // bn
    bv = min(sizes.block_v, max(16, next_pow2(V)))
    bd = _block_d(D, sizes.block_d)
    n_tiles = cdiv(V, bv)
    splits = sizes.num_splits or cdiv(sizes.target_programs, n_rows)
    splits = max(1, min(splits, n_tiles))
    per_split = cdiv(n_tiles, splits)

    part_shapes = [jax.ShapeDtypeStruct((splits, rows_padded), dt) for dt in (jnp.float32, jnp.int32, jnp.float32)]
    # Grid (row tiles, splits): the first grid axis is the fastest-varying launch index (CUDA's
    # x), so the row tiles of one vocabulary range start side by side and share its weight
    # through L2 instead of each streaming it from HBM.
    in_specs = [pl.BlockSpec((bn, D), lambda i, s: (i, 0)), pl.BlockSpec((D, V), lambda i, s: (0, 0))]
    operands = [h, weight]
    aliases = poison_outputs(part_shapes, in_specs, operands) if poison else {}

    best, arg, total = pl.pallas_call(
        functools.partial(_kernel, V=V, D=D, bv=bv, bd=bd, per_split=per_split, n_tiles=n_tiles),
        grid=(n_rows, splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bn), lambda i, s: (s, i))] * 3,
        out_shape=part_shapes,
        input_output_aliases=aliases,
        compiler_params=pl_triton.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages),
        interpret=interpret,
        name="nld_greedy_head_triton",
    )(*operands)
    token, prob = merge_head_partials(best, arg, total)
    return token[:N].reshape(lead), prob[:N].reshape(lead)
