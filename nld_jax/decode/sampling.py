"""Token choice and unmasking selection shared by the decode modes (NLD_SPEC.md section 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["choose_tokens", "chosen_probability", "rank_descending", "select_transfer"]


def choose_tokens(logits: jax.Array, key: jax.Array | None, temperature: jax.Array, sample: bool) -> jax.Array:
    """argmax at temperature 0; otherwise Gumbel-max at ``temperature``.

    The reference draws ``exp(l) / (-ln u)^T`` in float64; its argmax equals
    ``argmax(l - T * ln(-ln u))``, which we compute in log space so that float32 cannot
    overflow. It samples from ``softmax(l / T)``, the same law as multinomial sampling.
    """
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    u = jax.random.uniform(key, logits.shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    noisy = logits - temperature * jnp.log(-jnp.log(u))
    return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


def chosen_probability(logits: jax.Array, tokens: jax.Array, temperature: jax.Array | float = 1.0) -> jax.Array:
    """``softmax(logits / temperature)[token]`` in float32 (the unmasking confidence)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def rank_descending(scores: jax.Array) -> jax.Array:
    """Rank of each entry along the last axis (0 = largest; ties broken by position)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def select_transfer(confidence: jax.Array, is_mask: jax.Array, budget: jax.Array,
                    threshold: jax.Array, use_threshold: bool) -> jax.Array:
    """Which masked positions of each block row to unmask this step.

    Without a threshold: the ``budget [B]`` most confident masked positions. With one: the most
    confident masked position always, plus every other masked position whose confidence is at
    least ``threshold`` (the reference's top-k-then-filter).
    """
    conf = jnp.where(is_mask, confidence, -jnp.inf)
    rank = rank_descending(conf)
    if use_threshold:
        chosen = (rank == 0) | (conf >= threshold)
    else:
        chosen = rank < budget[:, None]
    return chosen & is_mask
