"""Block attention entry points, dispatched by ``implementation=``.

``"auto"`` picks the kernel of the current backend (Pallas TPU on TPU, Pallas Triton on GPU)
when it supports the shapes and falls back to ``"xla"`` (the jnp reference) otherwise, so CPU
always runs the reference. Naming a kernel runs it or raises ``NotImplementedError`` saying
why; ``fallback=True`` (what the model's registry entries use) degrades to the next choice
instead, so an odd head size never breaks decoding.

Implementations: ``xla``, ``pallas_tpu``, ``pallas_triton``, ``pallas_mosaic_gpu``, and the
interpreted ``pallas_interpret`` (the TPU kernels) / ``pallas_triton_interpret``, which run on
any backend, CPU included, and are what the CPU test suite checks.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.block_attention.masks import BlockDiffMask
from pallas_kernels.block_attention.reference import block_attention_reference, block_diff_attention_reference

__all__ = ["IMPLEMENTATIONS", "block_attention", "block_diff_attention", "resolve_implementation",
           "unsupported_reason"]

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", "pallas_interpret",
                   "pallas_triton_interpret")
_NEXT_CHOICE = {"pallas_mosaic_gpu": "pallas_triton"}  # then "xla"


def _platform() -> str:
    return jax.default_backend()


def unsupported_reason(implementation: str, q_shape, num_kv_heads: int, dtype) -> str | None:
    """Why ``implementation`` cannot run a query block of ``q_shape`` here, or None if it can."""
    from pallas_kernels.block_attention import kernel_mgpu, kernel_tpu, kernel_triton

    head_dim = q_shape[-1]
    if implementation in ("xla", "pallas_interpret"):
        return None
    if implementation == "pallas_triton_interpret":
        return None if kernel_triton.supported_triton(head_dim) else f"head_dim {head_dim} is not a power of two >= 16"
    if implementation == "pallas_tpu":
        if _platform() != "tpu":
            return f"needs a TPU (backend is {_platform()})"
        return None if kernel_tpu.supported_tpu(head_dim) else f"head_dim {head_dim} is not a multiple of 128"
    if implementation == "pallas_triton":
        if _platform() != "gpu":
            return f"needs a GPU (backend is {_platform()})"
        return None if kernel_triton.supported_triton(head_dim) else f"head_dim {head_dim} is not a power of two >= 16"
    if implementation == "pallas_mosaic_gpu":
        if _platform() != "gpu":
            return f"needs a GPU (backend is {_platform()})"
        return kernel_mgpu.unsupported_reason(q_shape, num_kv_heads, dtype)
    raise ValueError(f"unknown block attention implementation {implementation!r}; choose 'auto' or one of "
                     f"{IMPLEMENTATIONS}")


def resolve_implementation(implementation: str, q_shape, num_kv_heads: int, dtype, *,
                           fallback: bool = False) -> str:
    """The implementation that will actually run (see the module docstring)."""
    if implementation == "auto":
        preferred = {"tpu": "pallas_tpu", "gpu": "pallas_triton"}.get(_platform(), "xla")
        return resolve_implementation(preferred, q_shape, num_kv_heads, dtype, fallback=True)
    reason = unsupported_reason(implementation, q_shape, num_kv_heads, dtype)
    if reason is None:
        return implementation
    if not fallback:
        raise NotImplementedError(f"block attention implementation {implementation!r}: {reason}")
    return resolve_implementation(_NEXT_CHOICE.get(implementation, "xla"), q_shape, num_kv_heads, dtype,
                                  fallback=True)


def block_attention(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool, implementation: str = "auto",
                    sizes=None, fallback: bool = False, poison: bool = False):
    """Attention of ``q [B, T, H, Dh]`` over the valid cache prefix and the block's own K/V.

    Same contract as ``nld_jax.attention.attention_xla``: ``k, v [B, T, K, Dh]``,
    ``cache_k, cache_v [B, S, K, Dh]``, ``cache_lengths [B]``; ``causal`` within the block or
    bidirectional. ``sizes``: the kernel's block-size dataclass (None: its defaults).
    ``poison``: kernels start their outputs from NaN (tests: catches unwritten tiles).
    """
    impl = resolve_implementation(implementation, q.shape, k.shape[2], q.dtype, fallback=fallback)
    if impl != implementation:
        sizes = None  # block sizes are per kernel: a substitute runs with its own defaults
    args = (q, k, v, cache_k, cache_v, cache_lengths)
    if impl == "xla":
        return block_attention_reference(*args, causal=causal)
    if impl in ("pallas_tpu", "pallas_interpret"):
        from pallas_kernels.block_attention.kernel_tpu import block_attention_tpu

        return block_attention_tpu(*args, causal=causal, sizes=sizes, interpret=impl == "pallas_interpret",
                                   poison=poison)
    if impl in ("pallas_triton", "pallas_triton_interpret"):
        from pallas_kernels.block_attention.kernel_triton import block_attention_triton

        return block_attention_triton(*args, causal=causal, sizes=sizes,
                                      interpret=impl == "pallas_triton_interpret", poison=poison)
    from pallas_kernels.block_attention.kernel_mgpu import block_attention_mgpu

    return block_attention_mgpu(*args, causal=causal, sizes=sizes, poison=poison)


def block_diff_attention(q, k, v, block_size: int, *, implementation: str = "auto", sizes=None,
                         fallback: bool = False, poison: bool = False):
    """Training attention over ``[x_t noisy | x_0 clean]`` with the ``block_diff`` mask
    (``q [B, 2L, H, Dh]``, ``k, v [B, 2L, K, Dh]``), differentiable.

    ``block_size`` must be a Python int: the kernels' tile lists are built from it on the host.
    The kernels save the logsumexp and run block-sparse flash-attention backward kernels; the
    ``xla`` reference differentiates through its dense mask. ``pallas_mosaic_gpu`` uses the
    Triton kernels here.
    """
    n = q.shape[1]
    if n % 2 or k.shape[1] != n or v.shape[1] != n:
        raise ValueError(f"block_diff attention needs q, k, v of one even length 2L, got "
                         f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if q.shape[2] % k.shape[2] or k.shape != v.shape:
        raise ValueError(f"bad head layout: q {q.shape}, k {k.shape}, v {v.shape}")
    if implementation == "pallas_mosaic_gpu":
        implementation = "pallas_triton"
    impl = resolve_implementation(implementation, q.shape, k.shape[2], q.dtype, fallback=fallback)
    if impl != implementation:
        sizes = None  # block sizes are per kernel: a substitute runs with its own defaults
    if impl == "xla":
        return block_diff_attention_reference(q, k, v, block_size)
    return _block_diff_kernel(q, k, v, BlockDiffMask(n // 2, int(block_size)), impl, sizes, poison)


def _block_diff_impls(impl: str):
    """``(forward, backward, interpret)`` of a kernel family."""
    if impl in ("pallas_tpu", "pallas_interpret"):
        from pallas_kernels.block_attention.block_diff_tpu import block_diff_backward_tpu, block_diff_forward_tpu

        return block_diff_forward_tpu, block_diff_backward_tpu, impl == "pallas_interpret"
    from pallas_kernels.block_attention.block_diff_triton import (block_diff_backward_triton,
                                                                  block_diff_forward_triton)

    return block_diff_forward_triton, block_diff_backward_triton, impl == "pallas_triton_interpret"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _block_diff_kernel(q, k, v, mask, impl, sizes, poison):
    forward, _, interpret = _block_diff_impls(impl)
    return forward(q, k, v, mask, sizes, interpret=interpret, poison=poison)[0]


def _block_diff_fwd(q, k, v, mask, impl, sizes, poison):
    forward, _, interpret = _block_diff_impls(impl)
    out, lse = forward(q, k, v, mask, sizes, interpret=interpret, poison=poison)
    return out, (q, k, v, out, lse)


def _block_diff_bwd(mask, impl, sizes, poison, residuals, d_out):
    _, backward, interpret = _block_diff_impls(impl)
    q, k, v, out, lse = residuals
    return backward(q, k, v, out, lse, d_out, mask, sizes, interpret=interpret)


_block_diff_kernel.defvjp(_block_diff_fwd, _block_diff_bwd)
