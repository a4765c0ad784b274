"""Logit-level entry points: ``forward`` (causal logits) and ``block_logits`` (diffusion logits).

Both compile through the one program cache, with or without a mesh (the weights' own mesh by
default); under a mesh the result is sharded (batch over data/fsdp, vocabulary over tensor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nld_jax import validation
from nld_jax.config import NLDConfig
from nld_jax.placement import Placement
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.model import BlockPattern, forward_hidden, forward_logits, lm_head
from nld_jax.partitioning import named_sharding
from nld_jax.programs import PROGRAMS
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime

__all__ = ["forward", "block_logits", "block_logits_fn"]


def block_logits_fn(params, lora, prefix, block, *, config: NLDConfig, runtime: Runtime = DEFAULT_RUNTIME):
    """Pure version of :func:`block_logits`: prefix runs causally into a cache, then the block
    runs bidirectionally over it (cache read-only), with ``lora`` on ``o_proj`` if given."""
    B, P = prefix.shape
    C = block.shape[1]
    cache = KVCache.empty(config, B, P, params["embed_tokens"].dtype)
    _, k, v = forward_hidden(params, config, prefix, cache, pattern=BlockPattern.causal(B, P), uniform="causal",
                             runtime=runtime)
    cache = cache.write(k, v, runtime=runtime).advance(jnp.full((B,), P, jnp.int32))
    hidden, _, _ = forward_hidden(params, config, block, cache, pattern=BlockPattern.bidirectional(B, C),
                                  uniform="bidirectional", lora=lora, runtime=runtime)
    return lm_head(params, config, hidden, runtime)


def _logits_layout(model: NLDModel, place: Placement, shapes, out_shape):
    if place.mesh is None:
        return None, None
    tok = [named_sharding(("batch", "seq"), s, place.mesh, place.rules, what="tokens") for s in shapes]
    out = named_sharding(("batch", "seq", "act_vocab"), out_shape, place.mesh, place.rules, what="logits")
    return tok, out


def forward(model: NLDModel, tokens, *, mesh=None, rules=None, implementation: str = "auto") -> jax.Array:
    """Causal logits ``[B, T, V]`` (float32) of ``tokens`` at positions ``0..T-1``, no cache.

    Logits at position i predict token i+1.
    """
    tokens = validation.token_array(tokens, vocab=model.config.vocab_size, name="tokens")
    if tokens.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of "
                         f"{model.config.max_position_embeddings}")
    place = Placement.for_model(model, mesh, rules)
    params, _, p_sh, _ = place.weights(model)
    tok_sh, out_sh = _logits_layout(model, place, [tokens.shape], (*tokens.shape, model.config.V))
    args = (params, place.put(tokens, tok_sh[0] if tok_sh else None))
    program, _ = PROGRAMS.get(_forward, args, static=dict(config=model.config, runtime=place.runtime(implementation)),
                              in_shardings=None if p_sh is None else (p_sh, tok_sh[0]), out_shardings=out_sh)
    return program(*args)


def _forward(params, tokens, *, config, runtime):
    return forward_logits(params, config, tokens, runtime=runtime)


def block_logits(model: NLDModel, prefix, block, use_lora: bool = False, *, mesh=None, rules=None,
                 implementation: str = "auto") -> jax.Array:
    """Diffusion-mode logits ``[B, C, V]`` of ``block`` after ``prefix`` (both ``[B, *]`` ids).

    Logits at block position j predict the token at position j itself (unshifted).
    """
    vocab = model.config.vocab_size
    prefix = validation.token_array(prefix, vocab=vocab, name="prefix")
    block = validation.token_array(block, vocab=vocab, name="block")
    if prefix.shape[0] != block.shape[0]:
        raise ValueError(f"prefix batch {prefix.shape[0]} != block batch {block.shape[0]}")
    if prefix.shape[1] + block.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"prefix of {prefix.shape[1]} + block of {block.shape[1]} tokens exceed the model's context "
                         f"of {model.config.max_position_embeddings}")
    if validation.flag(use_lora, "use_lora") and model.lora is None:
        raise ValueError("use_lora=True but this checkpoint has no draft LoRA")
    place = Placement.for_model(model, mesh, rules)
    params, lora, p_sh, l_sh = place.weights(model)
    if not use_lora:
        lora, l_sh = None, None
    tok_sh, out_sh = _logits_layout(model, place, [prefix.shape, block.shape], (*block.shape, model.config.V))
    args = (params, lora, place.put(prefix, tok_sh[0] if tok_sh else None),
            place.put(block, tok_sh[1] if tok_sh else None))
    in_sh = None if p_sh is None else (p_sh, l_sh, tok_sh[0], tok_sh[1])
    program, _ = PROGRAMS.get(block_logits_fn, args,
                              static=dict(config=model.config, runtime=place.runtime(implementation)),
                              in_shardings=in_sh, out_shardings=out_sh)
    return program(*args)


