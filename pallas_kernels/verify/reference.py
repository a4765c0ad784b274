"""Pure-jnp references of the speculative verify pass (the oracles of the verify kernels).

The verify step of linear self-speculation (NLD_SPEC.md section 5) needs, per block position,
only the greedy token, its softmax probability and, per row, the acceptance length; the
attention it runs is ``block_attention`` in causal mode. These references spell the decisions
out with full ``[..., V]`` logits, which the kernels never materialise.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["greedy_head_reference", "accepted_length_reference", "verify_greedy_reference"]


def greedy_head_reference(hidden, weight):
    """``(argmax [...] int32, softmax(logits)[argmax] [...] float32)`` with
    ``logits = hidden @ weight`` in float32 (``hidden [..., D]``, ``weight [D, V]``).

    The probability of the maximum is ``1 / sum(exp(logits - max))``; ties go to the smallest
    token id (``jnp.argmax``)."""
    logits = jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)


def accepted_length_reference(draft, verified):
    """Draft tokens confirmed by the verify pass, plus the bonus token: the longest run of
    ``verified[:, i] == draft[:, i + 1]`` from ``i = 0``, plus one (``draft, verified [B, C]``)."""
    match = verified[:, :-1] == draft[:, 1:]
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32) + 1


def verify_greedy_reference(hidden, weight, draft):
    """Greedy verify decisions from the verify forward's ``hidden [B, C, D]``:
    ``(tokens [B, C], confidence [B, C], accepted [B])``."""
    tokens, confidence = greedy_head_reference(hidden, weight)
    return tokens, confidence, accepted_length_reference(draft, tokens)
