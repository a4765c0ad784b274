"""Token choice and unmasking selection shared by the decode modes (NLD_SPEC.md section 5).

Each row samples with its own settings and its own noise: the Gumbel noise of forward ``f`` at
block position ``j`` of a row comes from ``fold_in(fold_in(row_key, f), j)``, so a row's tokens
never depend on its neighbours, on the batch size or on the block width of the program it runs
in (a row of a serving batch samples what it samples alone).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.decode.state import Rows

__all__ = ["Decision", "decide", "gumbel_argmax", "truncate_logits", "chosen_probability", "rank_descending",
           "select_transfer"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Decision:
    tokens: jax.Array  # [B, W] int32
    confidence: jax.Array | None  # [B, W] softmax(raw logits)[token] (diffusion's unmasking confidence)
    confidence_t: jax.Array | None  # [B, W] softmax(logits / T)[token] (the speculative draft's; = confidence greedy)


def row_noise_keys(keys: jax.Array, forwards: jax.Array, width: int) -> jax.Array:
    """``[B, W, 2]`` keys: ``fold_in(fold_in(key_b, forward_b), j)``."""

    def per_row(key, forward):
        key = jax.random.fold_in(key, forward)
        return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(width))

    return jax.vmap(per_row)(keys, forwards)


def gumbel_argmax(logits: jax.Array, keys: jax.Array, temperature: jax.Array) -> jax.Array:
    """Sample from ``softmax(logits / T)`` per row (``temperature [B]``; 0 = argmax).

    The reference draws ``exp(l) / (-ln u)^T`` in float64; its argmax equals
    ``argmax(l - T * ln(-ln u))``, computed here in log space so that float32 cannot overflow.
    """
    V = logits.shape[-1]
    u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k, (V,), jnp.float32, minval=jnp.finfo(jnp.float32).tiny,
                                                       maxval=1.0)))(keys)
    T = temperature[:, None, None]
    noisy = jnp.where(T > 0, logits - T * jnp.log(-jnp.log(u)), logits)
    return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


def truncate_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, temperature: jax.Array) -> jax.Array:
    """Logits outside each row's top-k (``top_k [B]``, 0 = all) and nucleus (``top_p [B]``, the
    smallest set of the distribution at the row's temperature whose mass reaches p) set to -inf.
    The most likely token always stays."""
    V = logits.shape[-1]
    order = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None, None]
    kth = jnp.take_along_axis(order, k - 1, axis=-1)
    keep = logits >= kth
    T = jnp.maximum(temperature, 1e-6)[:, None, None]
    probs = jax.nn.softmax(order / T, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    # The most likely token is always in (a top_p that rounds to 0 in float32 keeps it alone).
    in_nucleus = (mass_before < top_p[:, None, None]) | (jnp.arange(V) == 0)
    cut = jnp.min(jnp.where(in_nucleus, order, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    keep = keep & (logits >= cut)
    return jnp.where(keep, logits, -jnp.inf)


def chosen_probability(logits: jax.Array, tokens: jax.Array, temperature: jax.Array | float = 1.0) -> jax.Array:
    """``softmax(logits / temperature)[token]`` in float32 (``temperature`` broadcastable to ``[B, W, 1]``).

    Written as ``exp(l_tok - max) / sum(exp(l - max))``, which for the argmax token is exactly
    the greedy head's ``1 / sum(exp(l - max))``: a greedy row decides the same in a sampled batch.
    """
    scaled = logits.astype(jnp.float32) / temperature
    top = jnp.max(scaled, axis=-1, keepdims=True)
    num = jnp.exp(jnp.take_along_axis(scaled, tokens[..., None], axis=-1) - top)[..., 0]
    return num / jnp.sum(jnp.exp(scaled - top), axis=-1)


def decide(logits_or_head, hidden: jax.Array, rows: Rows, forwards: jax.Array, *, sample: bool, truncate: bool,
           confidence: bool) -> Decision:
    """Tokens for ``hidden [B, W, D]`` and (if ``confidence``) their probabilities.

    ``logits_or_head`` is ``(lm_head, greedy_head)``: greedy decisions go through the greedy head
    (argmax and its probability, no ``[B, W, V]`` logits kept); sampling needs the full logits
    for the Gumbel noise.
    """
    lm_head, greedy_head = logits_or_head
    if not sample:
        tokens, conf = greedy_head(hidden, with_confidence=confidence)
        return Decision(tokens, conf, conf)
    logits = lm_head(hidden)
    T = rows.temperature
    choose_from = truncate_logits(logits, rows.top_k, rows.top_p, T) if truncate else logits
    tokens = gumbel_argmax(choose_from, row_noise_keys(rows.key, forwards, hidden.shape[1]), T)
    if not confidence:
        return Decision(tokens, None, None)
    conf = chosen_probability(logits, tokens)
    conf_t = chosen_probability(logits, tokens, jnp.where(T > 0, T, 1.0)[:, None, None])
    return Decision(tokens, conf, conf_t)


def rank_descending(scores: jax.Array) -> jax.Array:
    """Rank of each entry along the last axis (0 = largest; ties broken by position)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def select_transfer(confidence: jax.Array, is_mask: jax.Array, budget: jax.Array, threshold: jax.Array,
                    use_threshold: jax.Array) -> jax.Array:
    """Which masked positions of each block row to unmask this step.

    Without a threshold: the ``budget [B]`` most confident masked positions. With one: the most
    confident masked position always, plus every other masked position whose confidence is at
    least ``threshold [B]`` (the reference's top-k-then-filter). ``use_threshold [B]`` per row.
    """
    conf = jnp.where(is_mask, confidence, -jnp.inf)
    rank = rank_descending(conf)
    by_threshold = (rank == 0) | (conf >= threshold[:, None])
    by_budget = rank < budget[:, None]
    return jnp.where(use_threshold[:, None], by_threshold, by_budget) & is_mask
