"""The NLD forward pass as pure functions of (weights, inputs).

Every decode mode runs the same layers; only the attention pattern differs (``causal``), and
the draft LoRA is switched on per call (NLD_SPEC.md section 3). Layers are stacked and run with
``lax.scan``; the block's new K/V come back as scan outputs so that the caller decides whether
to write them into the cache (causal calls) or drop them (diffusion / draft calls).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax import attention as attention_lib
from nld_jax.config import NLDConfig
from nld_jax.kv_cache import KVCache
from nld_jax.ops import GREEDY_HEAD
from nld_jax.rope import apply_rope, llama4_query_scale, rope_cos_sin
from nld_jax.sharding import active_mesh, active_rules, constrain, mesh_size, shard_kernel

__all__ = ["rms_norm", "decoder_layer", "scan_layers", "embed", "forward_hidden", "lm_head", "logits_at",
           "forward_logits", "greedy_head", "greedy_head_xla", "head_weight"]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, cast back, then scale (the HF Mistral order of operations)."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def decoder_layer(config: NLDConfig, layer, x: jax.Array, cos, sin, q_scale, attend: Callable, lora=None):
    """One transformer layer. ``attend(q, k, v) -> [B, T, H, Dh]`` supplies the attention pattern
    (cache + block for decoding, the block_diff mask for training); everything else is shared.

    Returns ``(x, (k, v))``: the block's post-RoPE keys and values, for the caller to cache.
    """
    eps = config.rms_norm_eps
    attn_p, mlp_p = layer["self_attn"], layer["mlp"]
    # Under a mesh (nld_jax.sharding), pin the layout at each contraction: batch over data/fsdp,
    # heads and MLP width over tensor, the residual stream replicated over tensor. No-ops otherwise.
    q_axes, kv_axes = ("batch", "seq", "act_heads", "head_dim"), ("batch", "seq", "act_kv_heads", "head_dim")
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["input_layernorm"], eps)
        q = constrain(jnp.einsum("btd,dhk->bthk", h, attn_p["q_proj"]), q_axes)
        k = constrain(jnp.einsum("btd,dhk->bthk", h, attn_p["k_proj"]), kv_axes)
        v = constrain(jnp.einsum("btd,dhk->bthk", h, attn_p["v_proj"]), kv_axes)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q_scale is not None:  # llama-4 scale: queries only, after RoPE, never cached
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        out = constrain(attend(q, k, v), q_axes)
        o = jnp.einsum("bthk,hkd->btd", out, attn_p["o_proj"])
        if lora is not None:
            # PEFT runs the adapter in the adapter's dtype (float32) and adds it to o_proj(x).
            low = jnp.einsum("bthk,hkr->btr", out.astype(jnp.float32), lora["A"])
            delta = lora["scale"] * jnp.einsum("btr,rd->btd", low, lora["B"])
            if "token_gate" in lora:  # [B, T] 0/1: training runs the adapter on some tokens only
                delta = delta * lora["token_gate"][..., None]
            o = o + delta.astype(o.dtype)
        x = constrain(x + o, ("batch", "seq", "act_embed"))
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer["post_attention_layernorm"], eps)
        gate = constrain(jnp.einsum("btd,df->btf", h, mlp_p["gate_proj"]), ("batch", "seq", "act_mlp"))
        up = constrain(jnp.einsum("btd,df->btf", h, mlp_p["up_proj"]), ("batch", "seq", "act_mlp"))
        x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, mlp_p["down_proj"])
        x = constrain(x, ("batch", "seq", "act_embed"))
    return x, (k, v)


def scan_layers(params, config: NLDConfig, x: jax.Array, cos, sin, q_scale, attend: Callable,
                per_layer=None, lora=None, remat: bool = False):
    """All layers with ``lax.scan``. ``attend(q, k, v, per_layer_slice)`` gets the layer's slice of
    ``per_layer`` (e.g. its cached K/V). Returns ``(x, (k, v) stacked over layers)``."""
    lora_layers = None if lora is None else {"A": lora["A"], "B": lora["B"]}

    def body(x, xs):
        layer, extra, lora_l = xs
        if lora_l is not None:
            lora_l = {**lora_l, **{k: v for k, v in lora.items() if k not in ("A", "B")}}
        return decoder_layer(config, layer, x, cos, sin, q_scale, lambda q, k, v: attend(q, k, v, extra), lora_l)

    if remat:
        body = jax.checkpoint(body)
    return lax.scan(body, x, (params["layers"], per_layer, lora_layers))


def embed(params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed_tokens"], tokens, axis=0)


def forward_hidden(params, config: NLDConfig, tokens: jax.Array, cache: KVCache, *, causal: bool,
                   lora=None, attn_impl: str = "auto"):
    """Run the layers over ``tokens [B, T]`` placed after each row's cached prefix.

    Returns ``(hidden [B, T, D] after the final norm, k_new, v_new [L, B, T, K, Dh])``. Positions
    are absolute: ``cache.lengths[b] + arange(T)`` for RoPE and for the llama-4 query scale.
    ``lora`` (a LoRA tree or None) is applied to ``o_proj`` of every layer of this call.
    """
    T = tokens.shape[1]
    dtype = params["embed_tokens"].dtype
    positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cos, sin = rope_cos_sin(config, positions, dtype)
    q_scale = llama4_query_scale(config, positions)

    def attend(q, k, v, cached):
        ck, cv = cached
        return attention_lib.attention(q, k, v, ck.astype(dtype), cv.astype(dtype), cache.lengths,
                                       causal=causal, implementation=attn_impl)

    x = constrain(embed(params, tokens), ("batch", "seq", "act_embed"))
    x, (k_new, v_new) = scan_layers(params, config, x, cos, sin, q_scale, attend,
                                    (cache.k, cache.v), lora)
    return rms_norm(x, params["norm"], config.rms_norm_eps), k_new, v_new


def head_weight(params, config: NLDConfig) -> jax.Array:
    """The LM head as ``[D, V]`` (the embedding, transposed, when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"].T
    return params["diffusion_head"]


def lm_head(params, config: NLDConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits ``[..., V]`` (no scaling, no soft-cap)."""
    return jnp.einsum("...d,dv->...v", hidden, head_weight(params, config), preferred_element_type=jnp.float32)


def greedy_head_xla(hidden: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """argmax token and its softmax probability, ``[...]`` each, from ``hidden [..., D]``.

    ``softmax(l)[argmax] = 1 / sum(exp(l - max l))``. A kernel can compute this per vocabulary
    tile without ever writing the ``[..., V]`` logits to memory.
    """
    logits = jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)


def greedy_head(params, config: NLDConfig, hidden: jax.Array, implementation: str = "auto",
                with_confidence: bool = True):
    """Greedy decisions straight from hidden states (see :func:`greedy_head_xla`).

    ``with_confidence=False`` (AR steps, verification, one-shot drafts) lets the XLA path skip
    the softmax normaliser; the confidence returned is then None.
    """
    fn = GREEDY_HEAD.resolve(implementation)
    if not with_confidence and fn is GREEDY_HEAD.resolve("xla"):
        return jnp.argmax(lm_head(params, config, hidden), axis=-1).astype(jnp.int32), None
    mesh = active_mesh()
    if mesh is not None and fn is not GREEDY_HEAD.resolve("xla"):
        # A kernel sees whole rows of the vocabulary, so it cannot combine vocab shards (it
        # returns no per-shard max logit): with the head split over the vocabulary, the XLA
        # version runs (the partitioner splits it); otherwise the kernel runs per batch shard.
        if mesh_size(mesh, active_rules().mesh_axes("vocab")) > 1:
            fn = GREEDY_HEAD.resolve("xla")
        else:
            rows = ("batch",) + (None,) * (hidden.ndim - 1)
            fn = shard_kernel(fn, [rows, None], [rows[:-1], rows[:-1]])
    return fn(hidden, head_weight(params, config))


def logits_at(params, config: NLDConfig, hidden: jax.Array, index: jax.Array) -> jax.Array:
    """Logits of one position per row (``index [B]``): avoids a ``[B, T, V]`` tensor in prefill."""
    h = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    return lm_head(params, config, h)


def forward_logits(params, config: NLDConfig, tokens: jax.Array, *, attn_impl: str = "auto") -> jax.Array:
    """Causal logits ``[B, T, V]`` of a forward without cache (positions ``0..T-1``)."""
    B = tokens.shape[0]
    empty = KVCache.empty(config, B, 0, params["embed_tokens"].dtype)
    hidden, _, _ = forward_hidden(params, config, tokens, empty, causal=True, attn_impl=attn_impl)
    return lm_head(params, config, hidden)
