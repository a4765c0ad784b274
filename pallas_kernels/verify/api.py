"""Verify-pass entry points, dispatched by ``implementation=`` like ``block_attention.api``.

* :func:`greedy_head`: the fused LM head + argmax + confidence (``nld_jax.model.greedy_head_xla``
  semantics) without ``[..., V]`` logits in HBM. Sampling with a temperature needs the full
  logits for the Gumbel noise; the decode loops then call the plain LM head instead.
* :func:`verify_attention`: the verify block's attention, i.e. ``block_attention`` in causal mode.
* :func:`verify_greedy`: the greedy decisions of one verify step (tokens, confidence and the
  acceptance length), from the verify forward's hidden states.

Implementations: ``xla``, ``pallas_tpu``, ``pallas_triton``, ``pallas_mosaic_gpu`` (the head is
the Triton kernel there), ``pallas_interpret``, ``pallas_triton_interpret``.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.verify.reference import accepted_length_reference, greedy_head_reference

__all__ = ["IMPLEMENTATIONS", "greedy_head", "verify_attention", "verify_greedy", "resolve_head_implementation"]

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_triton", "pallas_mosaic_gpu", "pallas_interpret",
                   "pallas_triton_interpret")


def _unsupported_reason(implementation: str, model_dim: int) -> str | None:
    from pallas_kernels.verify.kernel_triton import supported_triton_head

    platform = jax.default_backend()
    if implementation in ("xla", "pallas_interpret"):
        return None
    if implementation == "pallas_tpu":
        return None if platform == "tpu" else f"needs a TPU (backend is {platform})"
    if implementation in ("pallas_triton", "pallas_mosaic_gpu", "pallas_triton_interpret"):
        if implementation != "pallas_triton_interpret" and platform != "gpu":
            return f"needs a GPU (backend is {platform})"
        return None if supported_triton_head(model_dim) else f"model dim {model_dim} is not a multiple of 16"
    raise ValueError(f"unknown greedy head implementation {implementation!r}; choose 'auto' or one of "
                     f"{IMPLEMENTATIONS}")


def resolve_head_implementation(implementation: str, model_dim: int, *, fallback: bool = False) -> str:
    if implementation == "auto":
        preferred = {"tpu": "pallas_tpu", "gpu": "pallas_triton"}.get(jax.default_backend(), "xla")
        return resolve_head_implementation(preferred, model_dim, fallback=True)
    reason = _unsupported_reason(implementation, model_dim)
    if reason is None:
        return implementation
    if not fallback:
        raise NotImplementedError(f"greedy head implementation {implementation!r}: {reason}")
    return "xla"


def greedy_head(hidden, weight, *, implementation: str = "auto", sizes=None, fallback: bool = False,
                poison: bool = False):
    """``(argmax [...] int32, its softmax probability [...] float32)`` of ``hidden [..., D] @ weight [D, V]``."""
    impl = resolve_head_implementation(implementation, hidden.shape[-1], fallback=fallback)
    if impl == "xla":
        return greedy_head_reference(hidden, weight)
    if impl in ("pallas_tpu", "pallas_interpret"):
        from pallas_kernels.verify.kernel_tpu import greedy_head_tpu

        return greedy_head_tpu(hidden, weight, sizes=sizes, interpret=impl == "pallas_interpret", poison=poison)
    from pallas_kernels.verify.kernel_triton import greedy_head_triton

    return greedy_head_triton(hidden, weight, sizes=sizes, interpret=impl == "pallas_triton_interpret",
                              poison=poison)


verify_attention = functools.partial(block_attention, causal=True)
verify_attention.__doc__ = "The verify block's attention: ``block_attention(..., causal=True)``."


def verify_greedy(hidden, weight, draft, *, implementation: str = "auto"):
    """``(tokens [B, C], confidence [B, C], accepted [B])`` of a greedy verify step: ``tokens[:, i]``
    is the greedy continuation after block slot i, ``accepted`` the confirmed draft run plus the
    bonus token (NLD_SPEC.md section 5)."""
    tokens, confidence = greedy_head(hidden, weight, implementation=implementation)
    return tokens, confidence, accepted_length_reference(draft, tokens)
