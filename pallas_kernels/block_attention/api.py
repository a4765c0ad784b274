"""Block attention, dispatched by ``implementation=``: the only dispatcher of this op.

Implementations: ``xla`` (:mod:`.reference`, the oracle; for a cache buffer of
:data:`.chunked.MIN_SLOTS` slots or more, :mod:`.chunked`: the same over only the windows that
hold valid entries), ``pallas_tpu``, ``pallas_triton``,
``pallas_mosaic_gpu``, and the interpreted ``pallas_interpret`` (the TPU kernels) /
``pallas_triton_interpret``, which run on any backend, CPU included. ``auto`` is
:func:`pallas_kernels.policy.auto_implementation` (XLA until a kernel is validated on the
platform's hardware). Naming a kernel runs it or raises ``NotImplementedError`` saying why;
``fallback=True`` degrades (Mosaic GPU -> Triton -> XLA) instead.

Patterns: XLA and the TPU and Triton kernels (compiled or interpreted) take any
:class:`BlockPattern` as data, every row its own (causal, bidirectional, mixed in one batch,
structured such as quadratic self-speculation's), and visit per query tile only the block-key
tiles holding a key it sees (``mask.py``). The Mosaic GPU kernel keeps a static pattern:
it runs only batches whose every row is ``uniform="causal"`` / ``"bidirectional"``; for
``uniform=None`` it is unsupported (``fallback=True`` then goes on to Triton).
"""

from __future__ import annotations

from pallas_kernels import policy
from pallas_kernels.block_attention.pattern import BlockPattern
from pallas_kernels.block_attention.chunked import block_attention_xla_chunked, use_chunked
from pallas_kernels.block_attention.reference import block_attention_xla

__all__ = ["IMPLEMENTATIONS", "UNIFORM_PATTERNS", "block_attention", "resolve_implementation", "unsupported_reason"]

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", "pallas_interpret",
                   "pallas_triton_interpret")
UNIFORM_PATTERNS = ("causal", "bidirectional")
_NEXT_CHOICE = {"pallas_mosaic_gpu": "pallas_triton"}  # then "xla"


def unsupported_reason(implementation: str, q_shape, num_kv_heads: int, dtype, uniform: str | None) -> str | None:
    """Why ``implementation`` cannot run this call here, or None if it can."""
    from pallas_kernels.block_attention import kernel_mgpu, kernel_tpu, kernel_triton

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown block attention implementation {implementation!r}; choose 'auto' or one of "
                         f"{IMPLEMENTATIONS}")
    if uniform is not None and uniform not in UNIFORM_PATTERNS:
        raise ValueError(f"uniform must be None or one of {UNIFORM_PATTERNS}, got {uniform!r}")
    if implementation == "xla":
        return None
    if implementation == "pallas_mosaic_gpu" and uniform is None:
        return "the Mosaic GPU kernel takes only a batch-uniform causal or bidirectional pattern (uniform=None)"
    head_dim, platform = q_shape[-1], policy.platform()
    if implementation == "pallas_interpret":
        return None
    if implementation == "pallas_triton_interpret":
        return None if kernel_triton.supported_triton(head_dim) else f"head_dim {head_dim} is not a power of two >= 16"
    if implementation == "pallas_tpu":
        if platform != "tpu":
            return f"needs a TPU (backend is {platform})"
        return None if kernel_tpu.supported_tpu(head_dim) else f"head_dim {head_dim} is not a multiple of 128"
    if platform != "gpu":
        return f"needs a GPU (backend is {platform})"
    if implementation == "pallas_triton":
        return None if kernel_triton.supported_triton(head_dim) else f"head_dim {head_dim} is not a power of two >= 16"
    return kernel_mgpu.unsupported_reason(q_shape, num_kv_heads, dtype)


def resolve_implementation(implementation: str, q_shape, num_kv_heads: int, dtype, *, uniform: str | None = None,
                           fallback: bool = False) -> str:
    """The implementation that will actually run (see the module docstring)."""
    if implementation == "auto":
        implementation, fallback = policy.auto_implementation("block_attention"), True
    reason = unsupported_reason(implementation, q_shape, num_kv_heads, dtype, uniform)
    if reason is None:
        return implementation
    if not fallback:
        raise NotImplementedError(f"block attention implementation {implementation!r}: {reason}")
    return resolve_implementation(_NEXT_CHOICE.get(implementation, "xla"), q_shape, num_kv_heads, dtype,
                                  uniform=uniform, fallback=True)


def block_attention(q, k, v, cache_k, cache_v, cache_lengths, pattern: BlockPattern, *, uniform: str | None = None,
                    implementation: str = "auto", sizes=None, fallback: bool = False, poison: bool = False):
    """Attention of ``q [B, T, H, Dh]`` over the valid cache prefix and the block's own K/V.

    ``k, v [B, T, K, Dh]``, ``cache_k, cache_v [B, S, K, Dh]``, ``cache_lengths [B]`` (lengths past
    ``S`` mean the whole cache), ``pattern`` the block's own visibility (:class:`BlockPattern`).
    ``uniform``: ``"causal"`` / ``"bidirectional"`` when every row has that pattern (the caller
    vouches for it), None otherwise: a hint that only the Mosaic GPU kernel, which needs a
    static pattern, uses; the others read ``pattern``. ``sizes``: the kernel's
    block-size dataclass (None: its defaults). ``poison``: kernels start their outputs from NaN
    (tests: catches unwritten tiles).
    """
    impl = resolve_implementation(implementation, q.shape, k.shape[2], q.dtype, uniform=uniform, fallback=fallback)
    if impl != implementation:
        sizes = None  # block sizes are per kernel: a substitute runs with its own defaults
    args = (q, k, v, cache_k, cache_v, cache_lengths)
    if impl == "xla":
        if use_chunked(cache_k.shape[1]):  # a long buffer: score only the windows up to the longest valid prefix
            return block_attention_xla_chunked(*args, pattern)
        return block_attention_xla(*args, pattern)
    if impl in ("pallas_tpu", "pallas_interpret"):
        from pallas_kernels.block_attention.kernel_tpu import block_attention_tpu

        return block_attention_tpu(*args, pattern, sizes=sizes, interpret=impl == "pallas_interpret", poison=poison)
    if impl in ("pallas_triton", "pallas_triton_interpret"):
        from pallas_kernels.block_attention.kernel_triton import block_attention_triton

        return block_attention_triton(*args, pattern, sizes=sizes, interpret=impl == "pallas_triton_interpret",
                                      poison=poison)
    from pallas_kernels.block_attention.kernel_mgpu import block_attention_mgpu

    return block_attention_mgpu(*args, causal=uniform == "causal", sizes=sizes, poison=poison)
