"""Logit-level entry points: ``forward`` (causal logits) and ``block_logits`` (diffusion logits)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.config import NLDConfig
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.model import forward_hidden, forward_logits, lm_head

__all__ = ["forward", "block_logits", "block_logits_fn"]


def _as_batch(tokens, name: str, vocab: int) -> jnp.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [B, T] array or list of equal-length lists")
    if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab})")
    return jnp.asarray(arr, jnp.int32)


_forward_jit = jax.jit(forward_logits, static_argnames=("config", "attn_impl"))


def forward(model: NLDModel, tokens, *, attn_impl: str = "auto") -> jax.Array:
    """Causal logits ``[B, T, V]`` (float32) of ``tokens`` at positions ``0..T-1``, no cache.

    Logits at position i predict token i+1.
    """
    tokens = _as_batch(tokens, "tokens", model.config.vocab_size)
    if tokens.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of "
                         f"{model.config.max_position_embeddings}")
    return _forward_jit(model.params, config=model.config, tokens=tokens, attn_impl=attn_impl)


def block_logits_fn(params, lora, prefix, block, *, config: NLDConfig, attn_impl: str = "auto"):
    """Pure version of :func:`block_logits`: prefix runs causally into a cache, then the block
    runs bidirectionally over it (cache read-only), with ``lora`` on ``o_proj`` if given."""
    B, P = prefix.shape
    cache = KVCache.empty(config, B, P, params["embed_tokens"].dtype)
    _, k, v = forward_hidden(params, config, prefix, cache, causal=True, attn_impl=attn_impl)
    cache = cache.write(k, v).advance(jnp.full((B,), P, jnp.int32))
    hidden, _, _ = forward_hidden(params, config, block, cache, causal=False, lora=lora, attn_impl=attn_impl)
    return lm_head(params, config, hidden)


_block_logits_jit = jax.jit(block_logits_fn, static_argnames=("config", "attn_impl"))


def block_logits(model: NLDModel, prefix, block, use_lora: bool = False, *, attn_impl: str = "auto") -> jax.Array:
    """Diffusion-mode logits ``[B, C, V]`` of ``block`` after ``prefix`` (both ``[B, *]`` ids).

    Logits at block position j predict the token at position j itself (unshifted).
    """
    prefix = _as_batch(prefix, "prefix", model.config.vocab_size)
    block = _as_batch(block, "block", model.config.vocab_size)
    if prefix.shape[0] != block.shape[0]:
        raise ValueError(f"prefix batch {prefix.shape[0]} != block batch {block.shape[0]}")
    if use_lora and model.lora is None:
        raise ValueError("use_lora=True but this checkpoint has no draft LoRA")
    lora = model.lora if use_lora else None
    return _block_logits_jit(model.params, lora, prefix, block, config=model.config, attn_impl=attn_impl)
