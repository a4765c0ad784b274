"""Training (``block_diff``) attention: Pallas Triton (GPU) kernels, forward and backward.

Same block-sparse plan as ``block_diff_tpu``: the host-built tile table of
:class:`BlockDiffMask` lists, per query tile, the non-empty key tiles (and per key tile the
non-empty query tiles, for dK/dV); every program loops over exactly its list, so empty tiles
cost nothing and FULL tiles skip the element mask.

* forward / dQ: one program per (batch, query head, query tile).
* dK / dV: one program per (batch, KV head, key tile), looping over the G query heads of its
  group and their query tiles, so each KV head's gradient is reduced in registers.

Tiles are powers of two >= 16 (``tl.dot``); ragged edges are masked loads and stores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import NEG_INF, idiv, irem, matmul_precision, next_pow2, poison_outputs
from pallas_kernels.block_diff.mask import BlockDiffMask
from pallas_kernels.block_sparse import FULL

__all__ = ["TritonBlockDiffSizes", "block_diff_forward_triton", "block_diff_backward_triton"]


@dataclasses.dataclass(frozen=True)
class TritonBlockDiffSizes:
    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def _plan(mask: BlockDiffMask, sizes):
    sizes = sizes or TritonBlockDiffSizes()
    n = 2 * mask.seq_len
    bq, bk = min(sizes.block_q, max(16, next_pow2(n))), min(sizes.block_kv, max(16, next_pow2(n)))
    return sizes, bq, bk, mask.block_info(bq, bk)


def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=matmul_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _load_rows(ref, start, size, ok, head=None):
    """Rows ``[start, start + size)`` (of head ``head`` when given: one indexer, which is all the
    Triton lowering accepts), zero where ``ok`` is False."""
    from jax.experimental.pallas import triton as pl_triton

    if head is None:
        view = ref.at[pl.ds(start, size)]
    elif len(ref.shape) == 3:  # [rows, heads, Dh]
        view = ref.at[pl.ds(start, size), head]
    else:  # [heads, rows]
        view = ref.at[head, pl.ds(start, size)]
    extra = len(view.shape) - 1
    return pl_triton.load(view, mask=ok.reshape((size,) + (1,) * extra), other=0.0)


def _store_rows(ref, start, value, ok):
    from jax.experimental.pallas import triton as pl_triton

    pl_triton.store(ref.at[pl.ds(start, value.shape[0])], value.astype(ref.dtype),
                    mask=ok.reshape((value.shape[0],) + (1,) * (value.ndim - 1)))


def _visible(mask, kind, q_pos, k_pos, n):
    inside = (q_pos[:, None] < n) & (k_pos[None, :] < n)
    return ((kind == FULL) | mask(q_pos[:, None], k_pos[None, :])) & inside


def _params(sizes):
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)


# ------------------------------------------------------------------------------------------ forward


def _fwd_kernel(index_ref, kind_ref, count_ref, q_ref, k_ref, v_ref, *refs, mask, bq, bk, n, scale):
    o_ref, lse_ref = refs[-2:]  # aliased poison inputs may precede them
    i = pl.program_id(2)
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q = _load_rows(q_ref, i * bq, bq, q_pos < n)

    def step(t, carry):
        acc, m, l = carry
        tile, kind = index_ref[t], kind_ref[t]
        k_pos = tile * bk + jnp.arange(bk, dtype=jnp.int32)
        k = _load_rows(k_ref, tile * bk, bk, k_pos < n)
        v = _load_rows(v_ref, tile * bk, bk, k_pos < n)
        s = jnp.where(_visible(mask, kind, q_pos, k_pos, n), _dot(q, k, 1, 1) * scale, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_shift = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_shift)
        p = jnp.exp(s - m_shift[:, None])
        return alpha[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0), m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, count_ref[...], step, init)
    _store_rows(o_ref, i * bq, acc / jnp.where(l == 0, 1.0, l)[:, None], q_pos < n)
    _store_rows(lse_ref, i * bq, m + jnp.log(l), q_pos < n)


def block_diff_forward_triton(q, k, v, mask: BlockDiffMask, sizes=None, interpret=False, poison: bool = False):
    """``(out [B, 2L, H, Dh], lse [B, H, 2L] float32)``; ``poison``: outputs start from NaN."""
    B, n, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    sizes, bq, bk, info = _plan(mask, sizes)
    kv_index, kv_kind, kv_count = info.by_query
    nq, width = kv_index.shape
    table = pl.BlockSpec((None, width), lambda b, h, i: (i, 0))
    in_specs = [table, table, pl.BlockSpec((None,), lambda b, h, i: (i,)),
                pl.BlockSpec((None, n, None, Dh), lambda b, h, i: (b, 0, h, 0)),
                pl.BlockSpec((None, n, None, Dh), lambda b, h, i: (b, 0, idiv(h, G), 0)),
                pl.BlockSpec((None, n, None, Dh), lambda b, h, i: (b, 0, idiv(h, G), 0))]
    operands = [jnp.asarray(kv_index), jnp.asarray(kv_kind), jnp.asarray(kv_count), q, k, v]
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, n), jnp.float32)]
    aliases = poison_outputs(out_shapes, in_specs, operands) if poison else {}
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, mask=mask, bq=bq, bk=bk, n=n, scale=1.0 / Dh ** 0.5),
        grid=(B, H, nq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, n, None, Dh), lambda b, h, i: (b, 0, h, 0)),
                   pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))],
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=_params(sizes), interpret=interpret, name="nld_block_diff_fwd_triton",
    )(*operands)
    return out, lse


# ----------------------------------------------------------------------------------------- backward


def _tile_grads(mask, kind, q_pos, k_pos, q, k, v, do, lse, delta, n, scale):
    visible = _visible(mask, kind, q_pos, k_pos, n)
    p = jnp.where(visible, jnp.exp(_dot(q, k, 1, 1) * scale - lse[:, None]), 0.0)
    ds = jnp.where(visible, p * (_dot(do, v, 1, 1) - delta[:, None]), 0.0)
    return p, ds


def _dq_kernel(index_ref, kind_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, mask,
               bq, bk, n, scale):
    i = pl.program_id(2)
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q_ok = q_pos < n
    q, do = _load_rows(q_ref, i * bq, bq, q_ok), _load_rows(do_ref, i * bq, bq, q_ok)
    lse, delta = _load_rows(lse_ref, i * bq, bq, q_ok), _load_rows(delta_ref, i * bq, bq, q_ok)

    def step(t, dq):
        tile, kind = index_ref[t], kind_ref[t]
        k_pos = tile * bk + jnp.arange(bk, dtype=jnp.int32)
        k, v = _load_rows(k_ref, tile * bk, bk, k_pos < n), _load_rows(v_ref, tile * bk, bk, k_pos < n)
        _, ds = _tile_grads(mask, kind, q_pos, k_pos, q, k, v, do, lse, delta, n, scale)
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = lax.fori_loop(0, count_ref[...], step, jnp.zeros(q.shape, jnp.float32))
    _store_rows(dq_ref, i * bq, dq * scale, q_ok)


def _dkv_kernel(index_ref, kind_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                mask, group, bq, bk, n, scale):
    kv_head, j = pl.program_id(1), pl.program_id(2)
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
    k_ok = k_pos < n
    k, v = _load_rows(k_ref, j * bk, bk, k_ok), _load_rows(v_ref, j * bk, bk, k_ok)
    count = count_ref[...]

    def step(r, carry):  # r walks (query head of the group, query tile of the list)
        dk, dv = carry
        head = kv_head * group + idiv(r, count)
        tile, kind = index_ref[irem(r, count)], kind_ref[irem(r, count)]
        q_pos = tile * bq + jnp.arange(bq, dtype=jnp.int32)
        q_ok = q_pos < n
        q = _load_rows(q_ref, tile * bq, bq, q_ok, head)
        do = _load_rows(do_ref, tile * bq, bq, q_ok, head)
        lse = _load_rows(lse_ref, tile * bq, bq, q_ok, head)
        delta = _load_rows(delta_ref, tile * bq, bq, q_ok, head)
        p, ds = _tile_grads(mask, kind, q_pos, k_pos, q, k, v, do, lse, delta, n, scale)
        return dk + _dot(ds.astype(q.dtype), q, 0, 0), dv + _dot(p.astype(do.dtype), do, 0, 0)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group * count, step, (zeros, zeros))
    _store_rows(dk_ref, j * bk, dk * scale, k_ok)
    _store_rows(dv_ref, j * bk, dv, k_ok)


def block_diff_backward_triton(q, k, v, out, lse, d_out, mask: BlockDiffMask, sizes=None, interpret=False):
    """``(dq, dk, dv)`` from the forward's output and logsumexp (flash-attention-2 backward)."""
    B, n, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    sizes, bq, bk, info = _plan(mask, sizes)
    scale = 1.0 / Dh ** 0.5
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    head_rows = lambda h: pl.BlockSpec((None, n, None, Dh), h)
    vec_rows = pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))

    kv_index, kv_kind, kv_count = info.by_query
    nq, width = kv_index.shape
    table = pl.BlockSpec((None, width), lambda b, h, i: (i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, mask=mask, bq=bq, bk=bk, n=n, scale=scale),
        grid=(B, H, nq),
        in_specs=[table, table, pl.BlockSpec((None,), lambda b, h, i: (i,)),
                  head_rows(lambda b, h, i: (b, 0, h, 0)), head_rows(lambda b, h, i: (b, 0, idiv(h, G), 0)),
                  head_rows(lambda b, h, i: (b, 0, idiv(h, G), 0)), head_rows(lambda b, h, i: (b, 0, h, 0)),
                  vec_rows, vec_rows],
        out_specs=head_rows(lambda b, h, i: (b, 0, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(sizes), interpret=interpret, name="nld_block_diff_dq_triton",
    )(jnp.asarray(kv_index), jnp.asarray(kv_kind), jnp.asarray(kv_count), q, k, v, d_out, lse, delta)

    q_index, q_kind, q_count = info.by_key
    nk, width_t = q_index.shape
    table_t = pl.BlockSpec((None, width_t), lambda b, h, j: (j, 0))
    all_heads = pl.BlockSpec((None, n, H, Dh), lambda b, h, j: (b, 0, 0, 0))
    all_vecs = pl.BlockSpec((None, H, n), lambda b, h, j: (b, 0, 0))
    kv_rows = head_rows(lambda b, h, j: (b, 0, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, mask=mask, group=G, bq=bq, bk=bk, n=n, scale=scale),
        grid=(B, K, nk),
        in_specs=[table_t, table_t, pl.BlockSpec((None,), lambda b, h, j: (j,)),
                  all_heads, kv_rows, kv_rows, all_heads, all_vecs, all_vecs],
        out_specs=[kv_rows, kv_rows],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(sizes), interpret=interpret, name="nld_block_diff_dkv_triton",
    )(jnp.asarray(q_index), jnp.asarray(q_kind), jnp.asarray(q_count), q, k, v, d_out, lse, delta)
    return dq, dk, dv
