"""Attention of a block of queries over (cached prefix ++ the block's own K/V).

One function serves every decode mode (NLD_SPEC.md section 4):

* ``causal=True``: query t of the block (absolute position ``length + t``) sees the whole valid
  cache and the block's keys ``u <= t``. Prefill, AR decode, speculative verify, block commit.
* ``causal=False``: every query sees the whole valid cache and the whole block (bidirectional
  within the block). Diffusion denoising and the speculative draft.

The cache is never written here: the caller writes the block's K/V afterwards (causal calls
only), so the same function handles both modes and the read-only guarantee of diffusion steps
is structural.

Kernels plug in through :func:`register_implementation`; ``implementation="auto"`` picks the
best registered kernel for the backend and falls back to the XLA version below.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp

__all__ = ["attention", "attention_xla", "register_implementation", "implementations"]


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                 cache_lengths: jax.Array, *, causal: bool) -> jax.Array: ...


_IMPLEMENTATIONS: dict[str, AttentionFn] = {}
# backend platform -> implementation names to try in order for "auto"
_AUTO_ORDER: dict[str, list[str]] = {}


def register_implementation(name: str, fn: AttentionFn, auto_for: tuple[str, ...] = ()) -> None:
    """Make ``fn`` selectable as ``implementation=name`` (and the default on ``auto_for`` platforms)."""
    _IMPLEMENTATIONS[name] = fn
    for platform in auto_for:
        _AUTO_ORDER.setdefault(platform, []).insert(0, name)


def implementations() -> list[str]:
    return sorted(_IMPLEMENTATIONS)


def attention_xla(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool):
    """Plain XLA attention; the numerical reference for every kernel.

    Shapes: ``q [B, T, H, Dh]``, ``k, v [B, T, K, Dh]``, ``cache_k, cache_v [B, S, K, Dh]``,
    ``cache_lengths [B]``. GQA is computed by grouping queries (``[B, T, K, G, Dh]``), so K/V are
    never repeated in memory. Scores and softmax are float32 whatever the compute dtype.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    S = cache_k.shape[1]
    G = H // K
    qg = q.reshape(B, T, K, G, Dh)
    scale = 1.0 / (Dh ** 0.5)
    f32 = jnp.float32
    s_cache = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k, preferred_element_type=f32) * scale
    s_block = jnp.einsum("btkgd,bukd->bkgtu", qg, k, preferred_element_type=f32) * scale

    cache_valid = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [B, S]
    s_cache = jnp.where(cache_valid[:, None, None, None, :], s_cache, -jnp.inf)
    if causal:
        tri = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]  # [T(query), T(key)]
        s_block = jnp.where(tri, s_block, -jnp.inf)

    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_block], axis=-1), axis=-1)
    p_cache, p_block = probs[..., :S].astype(v.dtype), probs[..., S:].astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", p_cache, cache_v, preferred_element_type=f32)
    out = out + jnp.einsum("bkgtu,bukd->btkgd", p_block, v, preferred_element_type=f32)
    return out.reshape(B, T, H, Dh).astype(q.dtype)


register_implementation("xla", attention_xla)


def resolve(implementation: str) -> AttentionFn:
    if implementation == "auto":
        for name in _AUTO_ORDER.get(jax.default_backend(), []):
            if name in _IMPLEMENTATIONS:
                return _IMPLEMENTATIONS[name]
        return attention_xla
    try:
        return _IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"registered: {implementations()} (or 'auto')") from None


def attention(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool, implementation: str = "auto"):
    """Dispatch to the selected implementation (see module docstring for the semantics)."""
    fn: Callable = resolve(implementation)
    return fn(q, k, v, cache_k, cache_v, cache_lengths, causal=causal)
