"""The model's two attention calls, and the only place the model reaches the kernels.

* :func:`decode_attention`: a block of queries over (cached prefix ++ the block's own K/V), the
  block's visibility given by a :class:`~pallas_kernels.block_attention.BlockPattern` (causal
  for prefill, AR, verify and commit; bidirectional for denoising and drafts; structured
  patterns for other modes; rows of one batch may differ, as data the kernels read). The cache is never written here:
  the caller writes the block's K/V afterwards (causal calls only), so the read-only guarantee
  of bidirectional forwards is structural.
* :func:`block_diff_attention`: the training layout ``[noisy | clean]``.

Both dispatch through the kernel package's own API (``implementation`` of the
:class:`~nld_jax.runtime.Runtime`); under a mesh a kernel runs per (batch, head) shard inside
``jax.shard_map``, while the XLA implementation is partitioned by XLA as is.
"""

from __future__ import annotations

import functools

from jax.sharding import PartitionSpec

from nld_jax.runtime import Runtime
from pallas_kernels.block_attention import BlockPattern, block_attention, resolve_implementation
from pallas_kernels.block_diff import block_diff_attention as _block_diff_attention
from pallas_kernels.block_diff import resolve_implementation as resolve_block_diff

__all__ = ["decode_attention", "block_diff_attention", "BlockPattern"]

_Q_AXES = ("batch", "seq", "act_heads", "head_dim")
_KV_AXES = ("batch", "seq", "act_kv_heads", "head_dim")
_CACHE_AXES = ("batch", "cache_seq", "act_kv_heads", "head_dim")
_ROWS = ("batch", "seq")


def decode_attention(q, k, v, cache_k, cache_v, cache_lengths, pattern: BlockPattern, *, uniform: str | None,
                     runtime: Runtime):
    """``q [B, T, H, Dh]``, ``k, v [B, T, K, Dh]``, ``cache_k, cache_v [B, S, K, Dh]``, ``cache_lengths [B]``.

    ``uniform``: ``"causal"`` / ``"bidirectional"`` when every row of the batch has that pattern,
    None otherwise (only the Mosaic GPU kernel needs a uniform pattern; the others read it as data).
    """
    impl = resolve_implementation(runtime.implementation, q.shape, k.shape[2], q.dtype, uniform=uniform)
    if impl == "xla" or not runtime.sharded:
        return block_attention(q, k, v, cache_k, cache_v, cache_lengths, pattern, uniform=uniform,
                               implementation=impl)

    def kernel(q, k, v, cache_k, cache_v, cache_lengths, group, reach):
        return block_attention(q, k, v, cache_k, cache_v, cache_lengths, BlockPattern(group, reach),
                               uniform=uniform, implementation=impl)

    sharded = runtime.shard_kernel(kernel, (_Q_AXES, _KV_AXES, _KV_AXES, _CACHE_AXES, _CACHE_AXES, ("batch",),
                                            _ROWS, _ROWS), _Q_AXES, adjust=_whole_groups)
    return sharded(q, k, v, cache_k, cache_v, cache_lengths, pattern.group, pattern.reach)


def block_diff_attention(q, k, v, block_length, *, runtime: Runtime):
    """``[noisy | clean]`` training attention (``q [B, 2L, H, Dh]``, ``k, v [B, 2L, K, Dh]``)."""
    impl = resolve_block_diff(runtime.implementation, q.shape, block_length)
    fn = functools.partial(_block_diff_attention, block_length=block_length, implementation=impl)
    if impl == "xla" or not runtime.sharded:
        return fn(q, k, v)
    sharded = runtime.shard_kernel(lambda q, k, v: fn(q, k, v), (_Q_AXES, _KV_AXES, _KV_AXES), _Q_AXES,
                                   adjust=_whole_groups)
    return sharded(q, k, v)


def _whole_groups(in_specs, out_spec):
    """A kernel shard must hold whole GQA groups: if the KV heads are replicated (they do not
    divide the tensor axis) the query heads are gathered too, so each shard runs all heads."""

    def heads(spec):
        return spec[2] if len(spec) > 2 else None

    def without_heads(spec):
        return PartitionSpec(*[None if i == 2 else p for i, p in enumerate(spec)])

    if heads(in_specs[1]) is None and heads(in_specs[0]) is not None:
        in_specs[0], out_spec = without_heads(in_specs[0]), without_heads(out_spec)
    return in_specs, out_spec
