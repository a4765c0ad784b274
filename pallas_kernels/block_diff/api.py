"""``block_diff`` training attention, dispatched by ``implementation=``: the only dispatcher of this op.

Implementations: ``xla`` (:mod:`.reference`), ``pallas_tpu``, ``pallas_triton``,
``pallas_interpret``, ``pallas_triton_interpret``; ``pallas_mosaic_gpu`` means the Triton kernels
here (there is no Hopper-specific training kernel). ``auto`` follows :mod:`pallas_kernels.policy`.
The kernels save the logsumexp and run block-sparse flash-attention backward kernels; they need a
Python-int block length (their tile lists are built on the host); a traced one runs on XLA.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import policy
from pallas_kernels.block_diff.mask import BlockDiffMask
from pallas_kernels.block_diff.reference import block_diff_attention_xla

__all__ = ["IMPLEMENTATIONS", "block_diff_attention", "resolve_implementation", "unsupported_reason"]

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", "pallas_interpret",
                   "pallas_triton_interpret")


def unsupported_reason(implementation: str, q_shape, block_length) -> str | None:
    from pallas_kernels.block_attention import kernel_tpu, kernel_triton

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown block_diff implementation {implementation!r}; choose 'auto' or one of "
                         f"{IMPLEMENTATIONS}")
    if implementation == "xla":
        return None
    if not isinstance(block_length, int):
        return "the kernels need a Python-int block length (their tile lists are built on the host)"
    head_dim, platform = q_shape[-1], policy.platform()
    if implementation == "pallas_interpret":
        return None
    if implementation == "pallas_tpu":
        if platform != "tpu":
            return f"needs a TPU (backend is {platform})"
        return None if kernel_tpu.supported_tpu(head_dim) else f"head_dim {head_dim} is not a multiple of 128"
    if implementation != "pallas_triton_interpret" and platform != "gpu":
        return f"needs a GPU (backend is {platform})"
    return None if kernel_triton.supported_triton(head_dim) else f"head_dim {head_dim} is not a power of two >= 16"


def resolve_implementation(implementation: str, q_shape, block_length, *, fallback: bool = False) -> str:
    if implementation == "auto":
        implementation, fallback = policy.auto_implementation("block_diff"), True
    reason = unsupported_reason(implementation, q_shape, block_length)
    if reason is None:
        return "pallas_triton" if implementation == "pallas_mosaic_gpu" else implementation
    if not fallback:
        raise NotImplementedError(f"block_diff implementation {implementation!r}: {reason}")
    return "xla"


def block_diff_attention(q, k, v, block_length, *, implementation: str = "auto", sizes=None,
                         fallback: bool = False, poison: bool = False):
    """Attention over ``[x_t noisy | x_0 clean]`` with the ``block_diff`` mask (``q [B, 2L, H, Dh]``,
    ``k, v [B, 2L, K, Dh]``), differentiable."""
    n = q.shape[1]
    if n % 2 or k.shape[1] != n or v.shape[1] != n:
        raise ValueError(f"block_diff attention needs q, k, v of one even length 2L, got "
                         f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if q.shape[2] % k.shape[2] or k.shape != v.shape:
        raise ValueError(f"bad head layout: q {q.shape}, k {k.shape}, v {v.shape}")
    impl = resolve_implementation(implementation, q.shape, block_length, fallback=fallback)
    if impl != implementation:
        sizes = None  # block sizes are per kernel: a substitute runs with its own defaults
    if impl == "xla":
        return block_diff_attention_xla(q, k, v, block_length)
    return _block_diff_kernel(q, k, v, BlockDiffMask(n // 2, int(block_length)), impl, sizes, poison)


def _block_diff_impls(impl: str):
    """``(forward, backward, interpret)`` of a kernel family."""
    if impl in ("pallas_tpu", "pallas_interpret"):
        from pallas_kernels.block_diff.kernel_tpu import block_diff_backward_tpu, block_diff_forward_tpu

        return block_diff_forward_tpu, block_diff_backward_tpu, impl == "pallas_interpret"
    from pallas_kernels.block_diff.kernel_triton import block_diff_backward_triton, block_diff_forward_triton

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
