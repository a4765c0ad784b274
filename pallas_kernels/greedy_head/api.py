"""The fused greedy LM head (matmul + argmax + confidence, no ``[..., V]`` logits in memory),
dispatched by ``implementation=``: the only dispatcher of this op.

Implementations: ``xla`` (:mod:`.reference`), ``pallas_tpu``, ``pallas_triton``,
``pallas_mosaic_gpu`` (the Triton kernel: there is no Hopper-specific head), ``pallas_interpret``,
``pallas_triton_interpret``. ``auto`` follows :mod:`pallas_kernels.policy`.
"""

from __future__ import annotations

from pallas_kernels import policy
from pallas_kernels.greedy_head.reference import greedy_head_xla

__all__ = ["IMPLEMENTATIONS", "greedy_head", "resolve_implementation", "unsupported_reason"]

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", "pallas_interpret",
                   "pallas_triton_interpret")


def unsupported_reason(implementation: str, model_dim: int) -> str | None:
    from pallas_kernels.greedy_head.kernel_triton import supported_triton_head

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown greedy head implementation {implementation!r}; choose 'auto' or one of "
                         f"{IMPLEMENTATIONS}")
    platform = policy.platform()
    if implementation in ("xla", "pallas_interpret"):
        return None
    if implementation == "pallas_tpu":
        return None if platform == "tpu" else f"needs a TPU (backend is {platform})"
    if implementation != "pallas_triton_interpret" and platform != "gpu":
        return f"needs a GPU (backend is {platform})"
    return None if supported_triton_head(model_dim) else f"model dim {model_dim} is not a multiple of 16"


def resolve_implementation(implementation: str, model_dim: int, *, fallback: bool = False) -> str:
    if implementation == "auto":
        implementation, fallback = policy.auto_implementation("greedy_head"), True
    reason = unsupported_reason(implementation, model_dim)
    if reason is None:
        return implementation
    if not fallback:
        raise NotImplementedError(f"greedy head implementation {implementation!r}: {reason}")
    return "xla"


def greedy_head(hidden, weight, *, with_confidence: bool = True, implementation: str = "auto", sizes=None,
                fallback: bool = False, poison: bool = False):
    """``(argmax [...] int32, its softmax probability [...] float32 or None)`` of
    ``hidden [..., D] @ weight [D, V]`` (see :func:`greedy_head_xla`)."""
    impl = resolve_implementation(implementation, hidden.shape[-1], fallback=fallback)
    if impl == "xla":
        return greedy_head_xla(hidden, weight, with_confidence=with_confidence)
    if impl in ("pallas_tpu", "pallas_interpret"):
        from pallas_kernels.greedy_head.kernel_tpu import greedy_head_tpu

        tokens, prob = greedy_head_tpu(hidden, weight, sizes=sizes, interpret=impl == "pallas_interpret",
                                       poison=poison)
    else:
        from pallas_kernels.greedy_head.kernel_triton import greedy_head_triton

        tokens, prob = greedy_head_triton(hidden, weight, sizes=sizes, interpret=impl == "pallas_triton_interpret",
                                          poison=poison)
    return tokens, (prob if with_confidence else None)
