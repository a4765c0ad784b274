"""Token choice and transfer selection against independent NumPy versions of the reference rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nld_jax.decode.sampling import chosen_probability, gumbel_argmax, row_noise_keys, select_transfer, truncate_logits
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
                              jnp.full((4,), threshold or 0.0, jnp.float32), jnp.full((4,), threshold is not None))
        np.testing.assert_array_equal(np.asarray(got), _reference_transfer(conf, is_mask, k, threshold))


@jax.jit
def _draw(logits, keys, forward, temperature):
    B = keys.shape[0]
    noise = row_noise_keys(keys, jnp.full((B,), forward, jnp.int32), 1)
    return gumbel_argmax(jnp.broadcast_to(logits, (B, 1, logits.shape[-1])), noise,
                         jnp.full((B,), temperature, jnp.float32))[:, 0]


def _sample(logits, seeds, temperature, forward=0):
    """One draw per seed of ``logits [V]`` (rows = seeds, width 1), in one compiled program."""
    keys = np.stack([np.zeros(len(seeds), np.uint32), np.asarray(seeds, np.uint32)], axis=1)
    return np.asarray(_draw(jnp.asarray(logits, jnp.float32), jnp.asarray(keys), forward, temperature))


def test_gumbel_max_samples_softmax_of_scaled_logits():
    logits = jnp.asarray([2.0, 1.0, 0.0, -1.0, 0.5])
    temperature = 0.7
    draws = _sample(logits, list(range(20000)), temperature)
    freq = np.bincount(draws, minlength=5) / len(draws)
    expected = np.exp(np.asarray(logits) / temperature)
    np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.015)
    # large logits do not overflow (the reference's exp() form would in float32)
    assert set(_sample(jnp.asarray([300.0, 299.0]), [1, 2, 3], 1.0)) <= {0, 1}
    # temperature 0 is the argmax, whatever the noise
    assert set(_sample(logits, list(range(50)), 0.0)) == {0}


def test_noise_depends_on_the_row_seed_and_forward_only():
    logits = jnp.zeros((8,))
    a = _sample(logits, list(range(64)), 1.0, forward=3)
    b = _sample(logits, list(range(64))[::-1], 1.0, forward=3)[::-1]  # same seeds, other rows
    np.testing.assert_array_equal(a, b)
    assert (a != _sample(logits, list(range(64)), 1.0, forward=4)).any()


def _reference_truncate(logits, k, p, temperature):
    """Top-k then nucleus over the temperature-scaled distribution, in float64."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(logits.shape, bool)
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    mass = 0.0
    for rank, j in enumerate(order):
        if (k and rank >= k) or (rank > 0 and mass >= p):
            break
        keep[j] = True
        mass += probs[j]
    return keep


@pytest.mark.parametrize("k,p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 0.9), (0, 0.05)])
def test_truncate_matches_reference(k, p):
    rng = np.random.default_rng(k * 10 + int(p * 100))
    logits = rng.normal(size=(3, 2, 32)).astype(np.float32) * 2
    got = np.asarray(truncate_logits(jnp.asarray(logits), jnp.full((3,), k, jnp.int32), jnp.full((3,), p, jnp.float32),
                                     jnp.full((3,), 0.8, jnp.float32)))
    for b in range(3):
        for w in range(2):
            np.testing.assert_array_equal(np.isfinite(got[b, w]), _reference_truncate(logits[b, w], k, p, 0.8))


def test_greedy_confidence():
    logits = jnp.asarray([[[0.1, 3.0, -2.0], [5.0, 5.5, 0.0]]])
    tok = jnp.asarray([[1, 1]])
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(chosen_probability(logits, tok)), p[0, [0, 1], [1, 1]][None], rtol=1e-6)


def test_accepted_length():
    draft = jnp.asarray([[7, 1, 2, 3, 4], [7, 1, 2, 3, 4], [7, 9, 9, 9, 9]])
    verified = jnp.asarray([[1, 2, 3, 4, 8], [1, 2, 0, 4, 8], [1, 2, 3, 4, 8]])
    # row 0: all 4 drafts match + bonus; row 1: 2 match + bonus; row 2: none + bonus
    np.testing.assert_array_equal(np.asarray(accepted_length(draft, verified)), [5, 3, 1])
