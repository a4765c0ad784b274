"""Logit-level entry points: ``forward`` (causal logits) and ``block_logits`` (diffusion logits).

Both compile through the one program cache, with or without a mesh (the weights' own mesh by
default); under a mesh the result is sharded (batch over data/fsdp, vocabulary over tensor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import validation
from nld_jax.config import NLDConfig
from nld_jax.placement import Placement
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.model import BlockPattern, forward_hidden, forward_logits, lm_head
from nld_jax.partitioning import named_sharding
from nld_jax.programs import PROGRAMS
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime
from nld_jax.vision.prompts import multimodal_prompts

__all__ = ["forward", "block_logits", "block_logits_fn"]


def block_logits_fn(params, lora, prefix, block, prefix_embeddings=None, *, config: NLDConfig,
                    runtime: Runtime = DEFAULT_RUNTIME):
    """Pure version of :func:`block_logits`: prefix runs causally into a cache, then the block
    runs bidirectionally over it (cache read-only), with ``lora`` on ``o_proj`` if given;
    ``prefix_embeddings [B, P, D]`` replace the prefix's token embeddings (images)."""
    B, P = prefix.shape
    C = block.shape[1]
    cache = KVCache.empty(config, B, P, params["embed_tokens"].dtype)
    _, k, v = forward_hidden(params, config, prefix, cache, pattern=BlockPattern.causal(B, P), uniform="causal",
                             embeddings=prefix_embeddings, runtime=runtime)
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


def _image_embeddings(model: NLDModel, tokens: np.ndarray, images, place: Placement):
    """``(embeddings [B, T, D], their sharding)`` of ``tokens`` that already hold every image's
    layout (a logit-level call keeps the caller's positions), or ``(None, None)``."""
    if images is None:
        return None, None
    placed, emb = multimodal_prompts(model.vision, model.vision_config, model.params, tokens.tolist(), images,
                                     model.config.bos_token_id, model.config.max_position_embeddings)
    if any(len(p) != tokens.shape[1] for p in placed):
        raise ValueError("with images, forward and block_logits take tokens that already hold each image's full "
                         "layout (nld_jax.vision.image_token_layout), so that positions stay the caller's")
    sharding = None if place.mesh is None else named_sharding(("batch", "seq", "act_embed"), emb.shape, place.mesh,
                                                              place.rules, what="embeddings")
    return place.put(emb.astype(model.dtype), sharding), sharding


def forward(model: NLDModel, tokens, *, images=None, mesh=None, rules=None, implementation: str = "auto") -> jax.Array:
    """Causal logits ``[B, T, V]`` (float32) of ``tokens`` at positions ``0..T-1``, no cache.

    Logits at position i predict token i+1. ``images`` (a vision-language checkpoint): one list
    per row, the rows holding each image's full token layout.
    """
    tokens = validation.token_array(tokens, vocab=model.config.vocab_size, name="tokens")
    if tokens.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of "
                         f"{model.config.max_position_embeddings}")
    place = Placement.for_model(model, mesh, rules)
    params, _, p_sh, _ = place.weights(model)
    tok_sh, out_sh = _logits_layout(model, place, [tokens.shape], (*tokens.shape, model.config.V))
    emb, emb_sh = _image_embeddings(model, tokens, images, place)
    args = (params, place.put(tokens, tok_sh[0] if tok_sh else None), emb)
    program, _ = PROGRAMS.get(_forward, args, static=dict(config=model.config, runtime=place.runtime(implementation)),
                              in_shardings=None if p_sh is None else (p_sh, tok_sh[0], emb_sh), out_shardings=out_sh)
    return program(*args)


def _forward(params, tokens, embeddings, *, config, runtime):
    return forward_logits(params, config, tokens, embeddings=embeddings, runtime=runtime)


def block_logits(model: NLDModel, prefix, block, use_lora: bool = False, *, images=None, mesh=None, rules=None,
                 implementation: str = "auto") -> jax.Array:
    """Diffusion-mode logits ``[B, C, V]`` of ``block`` after ``prefix`` (both ``[B, *]`` ids).

    Logits at block position j predict the token at position j itself (unshifted). ``images``:
    as in :func:`forward`, for the prefix.
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
    emb, emb_sh = _image_embeddings(model, prefix, images, place)
    args = (params, lora, place.put(prefix, tok_sh[0] if tok_sh else None),
            place.put(block, tok_sh[1] if tok_sh else None), emb)
    in_sh = None if p_sh is None else (p_sh, l_sh, tok_sh[0], tok_sh[1], emb_sh)
    program, _ = PROGRAMS.get(block_logits_fn, args,
                              static=dict(config=model.config, runtime=place.runtime(implementation)),
                              in_shardings=in_sh, out_shardings=out_sh)
    return program(*args)


