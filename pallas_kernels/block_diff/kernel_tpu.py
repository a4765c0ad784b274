"""Training (``block_diff``) attention: Pallas TPU kernels, forward and backward, block-sparse.

The ``[noisy | clean]`` mask of :class:`BlockDiffMask` is static, so its tile table
(:class:`BlockSparseInfo`) is built on the host once and scalar-prefetched. Each grid step
visits the next *non-empty* tile of the list, so the work is the mask's density (about a
third of the dense tiles at 2L = 8k, block 32), not all of it:

* forward / dQ: grid ``(B, H, query tiles, longest key-tile list)``; steps past a row's list
  repeat its last tile index (no DMA) and are skipped. FULL tiles skip the element mask.
* dK / dV: grid ``(B, K, key tiles, G x longest query-tile list)``: each KV head accumulates
  the gradient of all G query heads that share it, so K/V are neither repeated nor re-reduced.

Per-head layouts are free reshapes (``[B, 2L, heads * Dh]`` with a ``Dh`` block on the lanes),
so no transpose of q, k, v or the gradients is ever materialised. On real TPUs Dh must be a
multiple of 128.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import NEG_INF, idiv, irem, matmul_precision, poison_outputs
from pallas_kernels.block_attention.kernel_tpu import _online_softmax_step
from pallas_kernels.block_diff.mask import BlockDiffMask
from pallas_kernels.block_sparse import EMPTY, FULL

__all__ = ["TpuBlockDiffSizes", "block_diff_forward_tpu", "block_diff_backward_tpu"]


@dataclasses.dataclass(frozen=True)
class TpuBlockDiffSizes:
    block_q: int = 256  # query positions per tile (cut to the problem)
    block_kv: int = 256  # key positions per tile

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            if getattr(self, name) < 8 or getattr(self, name) % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {getattr(self, name)}")


def _tiles(mask: BlockDiffMask, sizes: TpuBlockDiffSizes | None):
    sizes = sizes or TpuBlockDiffSizes()
    n = 2 * mask.seq_len
    # Whole-axis tiles when the sequence is short (always legal block shapes), else the sizes.
    bq, bk = (n if n <= size else size for size in (sizes.block_q, sizes.block_kv))
    return bq, bk, mask.block_info(bq, bk)


def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=matmul_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _visible(mask, kind, q_tile, k_tile, bq, bk, n):
    """Element mask of a (query tile, key tile) pair; FULL tiles skip the predicate. Positions
    past 2L (ragged last tiles) are never visible."""
    q_pos = q_tile * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = k_tile * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    inside = (q_pos < n) & (k_pos < n)
    return ((kind == FULL) | mask(q_pos, k_pos)) & inside


def _rows_ok(tile, size, n):
    return tile * size + lax.broadcasted_iota(jnp.int32, (size, 1), 0) < n


def _zero_rows(x, ok):
    return jnp.where(ok, x, jnp.zeros((), x.dtype))


# ------------------------------------------------------------------------------------------ forward


def _fwd_kernel(kv_index, kv_kind, q_ref, k_ref, v_ref, *refs, mask, steps, bq, bk, n, scale):
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[-5:]  # aliased poison inputs may precede them
    i, j = pl.program_id(2), pl.program_id(3)
    kind, k_tile = kv_kind[i * steps + j], kv_index[i * steps + j]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(kind != EMPTY)
    def _tile():
        _online_softmax_step(q_ref, k_ref, v_ref, _visible(mask, kind, i, k_tile, bq, bk, n), _rows_ok(k_tile, bk, n),
                             m_sc, l_sc, acc_sc, scale)

    @pl.when(j == steps - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)  # -inf only for padding rows past 2L


def block_diff_forward_tpu(q, k, v, mask: BlockDiffMask, sizes=None, interpret=False, poison: bool = False):
    """``(out [B, 2L, H, Dh], lse [B, H, 2L, 1] float32)``; ``poison``: outputs start from NaN."""
    B, n, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    bq, bk, info = _tiles(mask, sizes)
    kv_index, kv_kind, _ = info.by_query
    nq, steps = kv_index.shape

    def q_map(b, h, i, j, kv_index, kv_kind):
        return b, i, h

    def kv_map(b, h, i, j, kv_index, kv_kind):
        return b, kv_index[i * steps + j], idiv(h, G)

    out_shapes = [jax.ShapeDtypeStruct((B, n, H * Dh), q.dtype), jax.ShapeDtypeStruct((B, H, n, 1), jnp.float32)]
    in_specs = [pl.BlockSpec((None, bq, Dh), q_map), pl.BlockSpec((None, bk, Dh), kv_map),
                pl.BlockSpec((None, bk, Dh), kv_map)]
    operands = [jnp.asarray(kv_index.reshape(-1)), jnp.asarray(kv_kind.reshape(-1)),
                q.reshape(B, n, H * Dh), k.reshape(B, n, K * Dh), v.reshape(B, n, K * Dh)]
    aliases = poison_outputs(out_shapes, in_specs, operands) if poison else {}
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, mask=mask, steps=steps, bq=bq, bk=bk, n=n, scale=1.0 / Dh ** 0.5),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, nq, steps),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, bq, Dh), q_map),
                       pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, Dh), jnp.float32)],
        ),
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="nld_block_diff_fwd",
    )(*operands)
    return out.reshape(B, n, H, Dh), lse


# ----------------------------------------------------------------------------------------- backward


def _probs_and_dscores(mask, kind, q_tile, k_tile, q, k, v, do, lse, delta, bq, bk, n, scale):
    """Recompute ``p`` for a tile from the saved logsumexp, and ``ds = p * (dp - delta)``."""
    s = _dot(q, k, 1, 1) * scale
    visible = _visible(mask, kind, q_tile, k_tile, bq, bk, n)
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    dp = _dot(do, v, 1, 1)
    ds = jnp.where(visible, p * (dp - delta), 0.0)
    return p, ds


def _dq_kernel(kv_index, kv_kind, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, mask, steps,
               bq, bk, n, scale):
    i, j = pl.program_id(2), pl.program_id(3)
    kind, k_tile = kv_kind[i * steps + j], kv_index[i * steps + j]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(kind != EMPTY)
    def _tile():
        k_ok = _rows_ok(k_tile, bk, n)
        k, v = _zero_rows(k_ref[...], k_ok), _zero_rows(v_ref[...], k_ok)
        _, ds = _probs_and_dscores(mask, kind, i, k_tile, q_ref[...], k, v, do_ref[...], lse_ref[...],
                                   delta_ref[...], bq, bk, n, scale)
        dq_sc[...] += _dot(ds.astype(k.dtype), k, 1, 0)

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index, q_kind, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *,
                mask, steps, group, bq, bk, n, scale):
    j, r = pl.program_id(2), pl.program_id(3)
    kind, q_tile = q_kind[j * steps + irem(r, steps)], q_index[j * steps + irem(r, steps)]

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(kind != EMPTY)
    def _tile():
        q_ok, k_ok = _rows_ok(q_tile, bq, n), _rows_ok(j, bk, n)
        q, do = _zero_rows(q_ref[...], q_ok), _zero_rows(do_ref[...], q_ok)
        k, v = _zero_rows(k_ref[...], k_ok), _zero_rows(v_ref[...], k_ok)
        lse, delta = jnp.where(q_ok, lse_ref[...], 0.0), jnp.where(q_ok, delta_ref[...], 0.0)
        p, ds = _probs_and_dscores(mask, kind, q_tile, j, q, k, v, do, lse, delta, bq, bk, n, scale)
        dv_sc[...] += _dot(p.astype(do.dtype), do, 0, 0)
        dk_sc[...] += _dot(ds.astype(q.dtype), q, 0, 0)

    @pl.when(r == group * steps - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def block_diff_backward_tpu(q, k, v, out, lse, d_out, mask: BlockDiffMask, sizes=None, interpret=False):
    """``(dq, dk, dv)`` from the forward's output and logsumexp (flash-attention-2 backward)."""
    B, n, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    bq, bk, info = _tiles(mask, sizes)
    scale = 1.0 / Dh ** 0.5
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    qf, dof = q.reshape(B, n, H * Dh), d_out.reshape(B, n, H * Dh)
    kf, vf = k.reshape(B, n, K * Dh), v.reshape(B, n, K * Dh)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    kv_index, kv_kind, _ = info.by_query
    nq, steps = kv_index.shape
    q_spec = pl.BlockSpec((None, bq, Dh), lambda b, h, i, j, *_: (b, i, h))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, bk, Dh), lambda b, h, i, j, index, kind: (b, index[i * steps + j], idiv(h, G)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, mask=mask, steps=steps, bq=bq, bk=bk, n=n, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H, nq, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec], out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, Dh), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qf.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="nld_block_diff_dq",
    )(jnp.asarray(kv_index.reshape(-1)), jnp.asarray(kv_kind.reshape(-1)), qf, kf, vf, dof, lse, delta)

    q_index, q_kind, _ = info.by_key
    nk, steps_t = q_index.shape

    def q_map(b, h, j, r, index, kind):  # h is the KV head; r walks (query head in group, tile)
        return b, index[j * steps_t + irem(r, steps_t)], h * G + idiv(r, steps_t)

    def row_map(b, h, j, r, index, kind):
        return b, h * G + idiv(r, steps_t), index[j * steps_t + irem(r, steps_t)], 0

    q_spec_t = pl.BlockSpec((None, bq, Dh), q_map)
    row_spec_t = pl.BlockSpec((None, None, bq, 1), row_map)
    kv_spec_t = pl.BlockSpec((None, bk, Dh), lambda b, h, j, r, *_: (b, j, h))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, mask=mask, steps=steps_t, group=G, bq=bq, bk=bk, n=n, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, K, nk, G * steps_t),
            in_specs=[q_spec_t, kv_spec_t, kv_spec_t, q_spec_t, row_spec_t, row_spec_t],
            out_specs=[kv_spec_t, kv_spec_t],
            scratch_shapes=[pltpu.VMEM((bk, Dh), jnp.float32), pltpu.VMEM((bk, Dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kf.shape, k.dtype), jax.ShapeDtypeStruct(vf.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="nld_block_diff_dkv",
    )(jnp.asarray(q_index.reshape(-1)), jnp.asarray(q_kind.reshape(-1)), qf, kf, vf, dof, lse, delta)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
