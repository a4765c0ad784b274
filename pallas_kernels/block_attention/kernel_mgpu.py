"""Block attention over the KV cache: the Pallas Mosaic GPU kernel for Hopper (TMA + wgmma).

One CTA per (KV head, key-axis split, batch row), warp-specialised like FlashAttention-3: a
memory warpgroup streams K/V tiles into a ring of ``max_concurrent_steps`` SMEM slots with
TMA, and one or two compute warpgroups (64 query rows each) run ``S = Q K^T`` and ``O += P V``
on the tensor cores with an online softmax in float32 registers.

* GQA: the G query heads of a KV head are the rows of the wgmma (``queries_as_rows``), so a
  K/V tile crosses HBM once per KV head.
* Ragged lengths: each split's range of cache tiles comes from the row's own
  ``cdiv(length, block_kv)``; tiles past it are never copied (the loops are bounded by it).
  The last split also takes the block's own K/V (one zero-padded tile, causal or
  bidirectional mask in registers).
* Splits write a normalised partial output (in the input dtype) and its logsumexp;
  :func:`merge_partials` folds them.

Scope: 16-bit inputs, head_dim a multiple of 64, at most 128 query rows (``T * G``) per KV
head, i.e. decode, diffusion and verify blocks; prefill chunks go to the Triton kernel (see
``api``). Slots past a row's length must hold finite values (true of ``KVCache``: zero
initialised, only ever written with K/V); the TMA zero-fills reads past ``S``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (cdiv, check_block_attention_args, idiv, merge_partials, queries_as_rows, round_up,
                                    rows_as_queries)

__all__ = ["MosaicBlockSizes", "block_attention_mgpu", "unsupported_reason"]

_LOG2E = math.log2(math.e)
_ROWS = 64  # wgmma rows per compute warpgroup


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    block_kv: int = 64  # keys per TMA tile (multiple of 64; raised to cover the block's own keys)
    max_concurrent_steps: int = 4  # K/V tiles in flight: 4 x 2 x 64 x 128 x 2 B = 128 KiB of SMEM
    num_splits: int | None = None  # key-axis ranges per (row, KV head); None: about one CTA per SM
    target_ctas: int = 132  # the SMs of an H100 SXM

    def __post_init__(self):
        if self.block_kv < 64 or self.block_kv % 64:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")


def unsupported_reason(q_shape, num_kv_heads: int, dtype) -> str | None:
    _, T, H, Dh = q_shape
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"wgmma needs bf16/f16 inputs, got {jnp.dtype(dtype).name}"
    if Dh % 64:
        return f"head_dim {Dh} is not a multiple of 64"
    if T * (H // num_kv_heads) > 2 * _ROWS:
        return f"{T} x {H // num_kv_heads} query rows per KV head exceed {2 * _ROWS} (a prefill chunk)"
    return None


def _kernel(len_ref, q_ref, ck_ref, cv_ref, kn_ref, vn_ref, o_ref, lse_ref, scoped, *, causal: bool, T: int, G: int,
            bk: int, slots: int, n_splits: int, compute_wgs: int, scale: float):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, h, split = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("split")
    wg = lax.axis_index("wg")
    (q_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free) = scoped
    dtype = q_ref.dtype

    # This split's steps: cache tiles [lo, hi) of the row's valid ones, then (last split only)
    # the block's own keys. Both warpgroup roles derive the same bounds.
    length = len_ref[b]
    n_cache = idiv(length + bk - 1, bk)
    per_split = idiv(n_cache + n_splits - 1, n_splits)
    lo = jnp.minimum(split * per_split, n_cache)
    hi = jnp.minimum(lo + per_split, n_cache)
    steps = hi - lo + (split == n_splits - 1).astype(jnp.int32)

    @pl.when(wg < compute_wgs)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(wg * _ROWS, _ROWS)], q_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        row_t = idiv(wg * _ROWS + plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 0, layout=plgpu.Layout.WGMMA), G)
        col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 1, layout=plgpu.Layout.WGMMA)

        def step(j, carry):
            acc, m, l = carry
            slot = lax.rem(j, slots)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((_ROWS, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            # Visible keys of this tile: a cache tile shows its first `cache_limit` slots to every
            # row; the block tile shows its first T keys (those <= the row's position if causal).
            is_cache = lo + j < hi
            cache_limit = jnp.where(is_cache, length - (lo + j) * bk, 0)
            block_limit = jnp.where(is_cache, 0, T)
            block_ok = col < block_limit
            if causal:
                block_ok = block_ok & (col <= row_t)
            s = jnp.where((col < cache_limit) | block_ok, s * (scale * _LOG2E), -jnp.inf)
            # Every row sees >= 1 key of every tile it visits (a valid cache slot, or block key 0),
            # so m stays finite after the first step: no -inf - -inf.
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(dtype)
            plgpu.barrier_wait(v_ready.at[slot])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        Dh = q_smem.shape[-1]
        acc = plgpu.layout_cast(jnp.full((_ROWS, Dh), 0, jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((_ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc, m, l = lax.fori_loop(0, steps, step, (acc, m, l))

        # An empty split (a short row) has l = 0: output 0 with logsumexp -inf, weight 0 in the merge.
        l_safe = jnp.where(l == 0, 1.0, l)
        q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
        lse_smem[...] = (m + jnp.log2(l)) * (1 / _LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, split, pl.ds(wg * _ROWS, _ROWS)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split, pl.ds(wg * _ROWS, _ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def fetch(j, slot):
            @pl.when(lo + j < hi)
            def _cache_tile():
                rows = (b, pl.ds((lo + j) * bk, bk), h)
                plgpu.copy_gmem_to_smem(ck_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(cv_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            @pl.when(lo + j >= hi)
            def _block_tile():
                plgpu.copy_gmem_to_smem(kn_ref.at[b, :, h], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(vn_ref.at[b, :, h], v_smem.at[slot], v_ready.at[slot])

        for j in range(slots):  # fill the ring
            pl.when(j < steps)(functools.partial(fetch, j, j))

        @pl.loop(slots, jnp.maximum(steps, slots))
        def _refill(j):
            slot = lax.rem(j, slots)
            # Both K and V of the slot's previous tile must be consumed before it is overwritten.
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            fetch(j, slot)


def block_attention_mgpu(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool,
                         sizes: MosaicBlockSizes | None = None, poison: bool = False):
    """:func:`pallas_kernels.block_attention.block_attention` semantics for a batch-uniform causal or
    bidirectional block; Hopper only."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, K, Dh, S = check_block_attention_args(q, k, v, cache_k, cache_v, cache_lengths)
    reason = unsupported_reason(q.shape, K, q.dtype)
    if reason:
        raise NotImplementedError(f"the Mosaic GPU kernel does not handle this call: {reason}")
    sizes = sizes or MosaicBlockSizes()
    G = H // K
    compute_wgs = 1 if T * G <= _ROWS else 2
    rows_padded = compute_wgs * _ROWS
    bk = max(sizes.block_kv, round_up(T, 64))
    lengths = jnp.clip(jnp.asarray(cache_lengths, jnp.int32), 0, S)
    if S == 0:
        S = bk
        cache_k = cache_v = jnp.zeros((B, S, K, Dh), q.dtype)
    n_splits = sizes.num_splits or cdiv(sizes.target_ctas, B * K)
    n_splits = max(1, min(n_splits, cdiv(S, bk)))
    slots = sizes.max_concurrent_steps

    q_rows = queries_as_rows(q, K, rows_padded)
    pad = ((0, 0), (0, bk - T), (0, 0), (0, 0))  # the block's keys as one zero-padded tile
    k_block, v_block = jnp.pad(k.astype(q.dtype), pad), jnp.pad(v.astype(q.dtype), pad)
    o_type = jax.ShapeDtypeStruct((B, K, n_splits, rows_padded, Dh), q.dtype)
    lse_type = jax.ShapeDtypeStruct((B, K, n_splits, rows_padded), jnp.float32)

    def entry(len_ref, q_ref, ck_ref, cv_ref, kn_ref, vn_ref, o_ref, lse_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: _kernel(len_ref, q_ref, ck_ref, cv_ref, kn_ref, vn_ref, o_ref, lse_ref, scoped,
                                    causal=causal, T=T, G=G, bk=bk, slots=slots, n_splits=n_splits,
                                    compute_wgs=compute_wgs, scale=1.0 / Dh ** 0.5),
            (plgpu.SMEM((compute_wgs, _ROWS, Dh), q.dtype, transforms=tiled),
             plgpu.SMEM((slots, bk, Dh), q.dtype, transforms=tiled),
             plgpu.SMEM((slots, bk, Dh), q.dtype, transforms=tiled),
             plgpu.SMEM((compute_wgs, _ROWS), jnp.float32)),
            (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_barriers=compute_wgs)),
            (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=slots),) * 2,
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(o_type, lse_type),
        grid=(K, n_splits, B),
        grid_names=("heads", "split", "batch"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, q_rows, cache_k.astype(q.dtype), cache_v.astype(q.dtype), k_block, v_block)
    del poison  # every (row, split) tile is written by its CTA; the GPU suite checks finiteness
    out = merge_partials(o.astype(jnp.float32), lse, jnp.ones_like(lse), axis=2).astype(q.dtype)
    return rows_as_queries(out, T, H)
