"""Independent numpy float64 oracles for the kernel test suites, and bf16 error bounds.

Written from NLD_SPEC.md section 4 and the docstrings of the ops, not from the code under
test: plain loops over rows and heads, float64 softmax. Every implementation of an op, the XLA
one included, is checked against these.
"""

from __future__ import annotations

import numpy as np

BF16_EPS = 2.0 ** -8  # relative spacing of bfloat16 (8 significant bits)


def as64(x) -> np.ndarray:
    return np.asarray(np.asarray(x, np.float32), np.float64)


def block_visible(group, reach) -> np.ndarray:
    """``[B, T, T]``: block query t sees block key u iff ``u < reach[t]`` or ``group[u] == group[t]``."""
    group, reach = np.asarray(group), np.asarray(reach)
    T = group.shape[1]
    u = np.arange(T)[None, None, :]
    return (u < reach[:, :, None]) | (group[:, None, :] == group[:, :, None])


def key_extent(visible) -> np.ndarray:
    """``[B, T]``: 1 + the largest block key each query of ``visible [B, T, T]`` sees (0: none)."""
    visible = np.asarray(visible, bool)
    return np.where(visible, np.arange(1, visible.shape[-1] + 1), 0).max(axis=-1)


def decode_attention(q, k, v, cache_k, cache_v, lengths, visible):
    """``(out [B, T, H, Dh], weighted |v| [B, T, H, Dh])`` in float64.

    Query t of row b sees the first ``lengths[b]`` cache slots and the block keys ``visible[b, t]``;
    GQA: query head h reads KV head ``h // (H // K)``. The second result, ``sum p |v|``, scales
    the rounding error of a bf16 probability-times-value product (see :func:`bf16_bound`).
    """
    q, k, v, cache_k, cache_v = map(as64, (q, k, v, cache_k, cache_v))
    B, T, H, Dh = q.shape
    K = k.shape[2]
    out, weighted = np.zeros_like(q), np.zeros_like(q)
    for b in range(B):
        n = min(int(lengths[b]), cache_k.shape[1])
        for h in range(H):
            kh = h // (H // K)
            keys = np.concatenate([cache_k[b, :n, kh], k[b, :, kh]])
            values = np.concatenate([cache_v[b, :n, kh], v[b, :, kh]])
            for t in range(T):
                seen = np.concatenate([np.ones(n, bool), np.asarray(visible[b, t], bool)])
                s = keys[seen] @ q[b, t, h] / np.sqrt(Dh)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, t, h] = p @ values[seen]
                weighted[b, t, h] = p @ np.abs(values[seen])
    return out, weighted


def masked_attention(q, k, v, mask):
    """``(out, weighted |v|)`` of ``q [B, Tq, H, Dh]`` over ``k, v [B, Tk, K, Dh]`` under a dense
    ``mask [Tq, Tk]`` (True = visible), float64."""
    q, k, v = map(as64, (q, k, v))
    B, Tq, H, Dh = q.shape
    K = k.shape[2]
    mask = np.asarray(mask, bool)
    out, weighted = np.zeros_like(q), np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            s = q[b, :, h] @ k[b, :, kh].T / np.sqrt(Dh)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[b, :, h] = p @ v[b, :, kh]
            weighted[b, :, h] = p @ np.abs(v[b, :, kh])
    return out, weighted


def bf16_bound(out, weighted, margin: float = 2.0) -> np.ndarray:
    """Elementwise error bound of bf16 attention against the float64 oracle on the same
    (bf16-valued) inputs: the probabilities rounded to bf16 before the value matmul (relative
    eps/2 each, at most ``eps/2 * sum p |v|``) and the output rounded to bf16 (``eps/2 |out|``),
    times ``margin``. Dropping one key of N moves an output by about ``|v| / N``, far above it."""
    return margin * 0.5 * BF16_EPS * (np.abs(out) + weighted) + 1e-6


def assert_within(actual, expected, bound, what: str = "output") -> None:
    actual = as64(actual)
    assert np.isfinite(actual).all(), f"{what}: non-finite values (an unwritten, poisoned tile or a NaN leak)"
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (f"{what}: |error| {err[worst]:.3g} exceeds the bound {np.broadcast_to(bound, err.shape)[worst]:.3g} "
                                  f"at {tuple(int(i) for i in worst)} ({int((err > bound).sum())} of {err.size} elements)")
