"""The greedy LM head in plain XLA: the ``xla`` implementation and the kernels' oracle."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["greedy_head_xla"]


def greedy_head_xla(hidden, weight, *, with_confidence: bool = True):
    """``(argmax [...] int32, softmax(logits)[argmax] [...] float32 or None)`` of
    ``logits = hidden [..., D] @ weight [D, V]`` in float32.

    The probability of the maximum is ``1 / sum(exp(logits - max))``: a kernel computes it per
    vocabulary tile without writing the ``[..., V]`` logits. Without ``with_confidence`` the
    normaliser is skipped (AR steps, verification, one-shot drafts). Ties go to the smallest id.
    """
    logits = jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not with_confidence:
        return tokens, None
    top = jnp.max(logits, axis=-1, keepdims=True)
    return tokens, 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)
