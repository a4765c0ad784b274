"""Token choice and transfer selection against independent NumPy versions of the reference rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nld_jax.decode.sampling import choose_tokens, chosen_probability, select_transfer
from nld_jax.decode.spec import accepted_length


def _reference_transfer(conf, is_mask, k, threshold):
    """The reference's rule: top-k over masked confidences; with a threshold, k = #masks and all
    but the first pick must reach the threshold."""
    out = np.zeros_like(is_mask)
    for b in range(conf.shape[0]):
        c = np.where(is_mask[b], conf[b], -np.inf)
        kk = int(is_mask[b].sum()) if threshold is not None else int(k[b])
        order = np.argsort(-c, kind="stable")[:kk]
        for rank, j in enumerate(order):
            if threshold is None or rank == 0 or c[j] >= threshold:
                out[b, j] = True
    return out & is_mask


@pytest.mark.parametrize("threshold", [None, 0.3, 0.9])
def test_select_transfer_matches_reference_rule(threshold):
    rng = np.random.default_rng(0)
    for _ in range(20):
        conf = rng.random((4, 16)).astype(np.float32)
        is_mask = rng.random((4, 16)) < 0.6
        k = rng.integers(0, 4, size=4).astype(np.int32)
        got = select_transfer(jnp.asarray(conf), jnp.asarray(is_mask), jnp.asarray(k),
                              jnp.float32(threshold or 0.0), threshold is not None)
        np.testing.assert_array_equal(np.asarray(got), _reference_transfer(conf, is_mask, k, threshold))


def test_gumbel_max_samples_softmax_of_scaled_logits():
    logits = jnp.asarray([2.0, 1.0, 0.0, -1.0, 0.5])
    temperature = 0.7
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draws = jax.vmap(lambda k: choose_tokens(logits, k, jnp.float32(temperature), True))(keys)
    freq = np.bincount(np.asarray(draws), minlength=5) / len(keys)
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    np.testing.assert_allclose(freq, expected, atol=0.015)
    # large logits do not overflow (the reference's exp() form would in float32)
    big = jnp.asarray([300.0, 299.0])
    assert int(choose_tokens(big, jax.random.PRNGKey(1), jnp.float32(1.0), True)) in (0, 1)


def test_greedy_choice_and_confidence():
    logits = jnp.asarray([[0.1, 3.0, -2.0], [5.0, 5.5, 0.0]])
    tok = choose_tokens(logits, None, jnp.float32(0), False)
    np.testing.assert_array_equal(np.asarray(tok), [1, 1])
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(chosen_probability(logits, tok)), p[[0, 1], [1, 1]], rtol=1e-6)


def test_accepted_length():
    draft = jnp.asarray([[7, 1, 2, 3, 4], [7, 1, 2, 3, 4], [7, 9, 9, 9, 9]])
    verified = jnp.asarray([[1, 2, 3, 4, 8], [1, 2, 0, 4, 8], [1, 2, 3, 4, 8]])
    # row 0: all 4 drafts match + bonus; row 1: 2 match + bonus; row 2: none + bonus
    np.testing.assert_array_equal(np.asarray(accepted_length(draft, verified)), [5, 3, 1])
