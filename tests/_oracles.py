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


def quadratic_visible(block_lengths, width: int) -> np.ndarray:
    """``[B, W, W]`` block visibility of quadratic self-speculation, from its description (row b
    has block length ``C = block_lengths[b]``): the seed and C-1 drafts (positions ``0..C-1``) are
    causal; group j (the C positions from ``C + j*C``) sees the seed, drafts 1..j and itself;
    positions past ``C + C*C`` are padding and see only themselves."""
    out = np.zeros((len(block_lengths), width, width), bool)
    for b, C in enumerate(block_lengths):
        for t in range(width):
            if t < C:
                out[b, t, :t + 1] = True
            elif t < C + C * C:
                j = (t - C) // C
                out[b, t, :j + 1] = True
                out[b, t, C + j * C:C + (j + 1) * C] = True
            else:
                out[b, t, t] = True
    return out


def tile_visible(visible, group: int, block_q: int, block_kv: int) -> np.ndarray:
    """``[B, n_q, n_kt]``: whether query tile i sees any key of key tile kt, for ``visible [B, T, T]``
    on the kernels' query-row axis (row ``t * group + g`` is position t; ``block_q`` rows a tile)."""
    visible = np.asarray(visible, bool)
    B, T, _ = visible.shape
    n_q, n_kt = -(-T * group // block_q), -(-T // block_kv)
    out = np.zeros((B, n_q, n_kt), bool)
    for i in range(n_q):
        positions = np.arange(i * block_q, min((i + 1) * block_q, T * group)) // group
        for kt in range(n_kt):
            out[:, i, kt] = visible[:, positions, kt * block_kv:(kt + 1) * block_kv].any(axis=(1, 2))
    return out


def extent_tiles(visible, group: int, block_q: int, block_kv: int) -> np.ndarray:
    """``[B, n_q]``: key tiles a query tile visits when it visits every tile up to the largest key
    one of its rows sees (the bound before tile lists): the count that lists are measured against."""
    extent = key_extent(visible)
    B, T = extent.shape
    n_q = -(-T * group // block_q)
    out = np.zeros((B, n_q), int)
    for i in range(n_q):
        positions = np.arange(i * block_q, min((i + 1) * block_q, T * group)) // group
        out[:, i] = -(-extent[:, positions].max(axis=1) // block_kv)
    return out


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
