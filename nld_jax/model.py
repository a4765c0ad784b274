"""The NLD forward pass as pure functions of (weights, inputs).

Every decode mode runs the same layers; only the attention pattern of the block differs
(NLD_SPEC.md section 3), and the draft LoRA is gated per row. Layers are stacked and run with
``lax.scan``; the block's new K/V come back as scan outputs so that the caller decides whether
to write them into the cache (causal calls) or drop them (bidirectional calls).

Static knobs come in one :class:`~nld_jax.runtime.Runtime` (kernels, mesh, rules): under a mesh
each contraction's output is pinned to the sharding its logical axes imply. Every weight
contraction goes through :func:`nld_jax.quant.einsum` (and the embedding through
:func:`nld_jax.quant.take`), so the same code runs on plain and on quantized weights.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax import quant
from nld_jax.attention import BlockPattern, decode_attention
from nld_jax.config import NLDConfig
from nld_jax.kv_cache import KVCache, dequantize_kv
from nld_jax.partitioning import mesh_size
from nld_jax.rope import apply_rope, llama4_query_scale, rope_cos_sin
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime
from pallas_kernels.greedy_head import greedy_head as _greedy_head
from pallas_kernels.greedy_head import resolve_implementation as resolve_greedy_head

__all__ = ["rms_norm", "decoder_layer", "scan_layers", "embed", "forward_hidden", "head_weight", "lm_head",
           "greedy_head", "forward_logits"]

_Q = ("batch", "seq", "act_heads", "head_dim")
_KV = ("batch", "seq", "act_kv_heads", "head_dim")
_RESIDUAL = ("batch", "seq", "act_embed")
_MLP = ("batch", "seq", "act_mlp")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, cast back, then scale (the HF Mistral order of operations)."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def decoder_layer(config: NLDConfig, layer, x: jax.Array, cos, sin, q_scale, attend: Callable, lora=None,
                  lora_gate=None, runtime: Runtime = DEFAULT_RUNTIME):
    """One transformer layer. ``attend(q, k, v) -> [B, T, H, Dh]`` supplies the attention pattern
    (cache + block for decoding, the block_diff layout for training); everything else is shared.

    ``lora``: this layer's ``{"A", "B"}`` and the tree's ``scale``, applied to ``o_proj``;
    ``lora_gate`` (``[B]`` or ``[B, T]``, 0/1) switches the adapter per row or token (drafts on,
    causal forwards off). Returns ``(x, (k, v))``: the block's post-RoPE keys and values.
    """
    eps = config.rms_norm_eps
    attn_p, mlp_p = layer["self_attn"], layer["mlp"]
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["input_layernorm"], eps)
        q = runtime.constrain(quant.einsum("btd,dhk->bthk", h, attn_p["q_proj"]), _Q)
        k = runtime.constrain(quant.einsum("btd,dhk->bthk", h, attn_p["k_proj"]), _KV)
        v = runtime.constrain(quant.einsum("btd,dhk->bthk", h, attn_p["v_proj"]), _KV)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q_scale is not None:  # llama-4 scale: queries only, after RoPE, never cached
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        out = runtime.constrain(attend(q, k, v), _Q)
        o = quant.einsum("bthk,hkd->btd", out, attn_p["o_proj"])
        if lora is not None:
            # PEFT runs the adapter in the adapter's dtype (float32) and adds it to o_proj(x).
            low = jnp.einsum("bthk,hkr->btr", out.astype(jnp.float32), lora["A"])
            delta = lora["scale"] * jnp.einsum("btr,rd->btd", low, lora["B"])
            if lora_gate is not None:
                gate = lora_gate.astype(jnp.float32)
                delta = delta * (gate[:, None, None] if gate.ndim == 1 else gate[..., None])
            o = o + delta.astype(o.dtype)
        x = runtime.constrain(x + o, _RESIDUAL)
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer["post_attention_layernorm"], eps)
        gate = runtime.constrain(quant.einsum("btd,df->btf", h, mlp_p["gate_proj"]), _MLP)
        up = runtime.constrain(quant.einsum("btd,df->btf", h, mlp_p["up_proj"]), _MLP)
        x = x + quant.einsum("btf,fd->btd", jax.nn.silu(gate) * up, mlp_p["down_proj"])
        x = runtime.constrain(x, _RESIDUAL)
    return x, (k, v)


def scan_layers(params, config: NLDConfig, x: jax.Array, cos, sin, q_scale, attend: Callable, per_layer=None,
                lora=None, lora_gate=None, remat: bool = False, runtime: Runtime = DEFAULT_RUNTIME):
    """All layers with ``lax.scan``. ``attend(q, k, v, per_layer_slice)`` gets the layer's slice of
    ``per_layer`` (e.g. its cached K/V). Returns ``(x, (k, v) stacked over layers)``."""
    lora_layers = None if lora is None else {"A": lora["A"], "B": lora["B"]}
    scale = None if lora is None else lora["scale"]

    def body(x, xs):
        layer, extra, lora_l = xs
        if lora_l is not None:
            lora_l = {**lora_l, "scale": scale}
        return decoder_layer(config, layer, x, cos, sin, q_scale, lambda q, k, v: attend(q, k, v, extra), lora_l,
                             lora_gate, runtime)

    if remat:
        body = jax.checkpoint(body)
    return lax.scan(body, x, (params["layers"], per_layer, lora_layers))


def embed(params, tokens: jax.Array) -> jax.Array:
    return quant.take(params["embed_tokens"], tokens)


def forward_hidden(params, config: NLDConfig, tokens: jax.Array, cache: KVCache, *, pattern: BlockPattern,
                   uniform: str | None = None, lora=None, lora_gate=None, embeddings=None, offsets=None,
                   runtime: Runtime = DEFAULT_RUNTIME):
    """Run the layers over ``tokens [B, T]`` placed after each row's cached prefix.

    Returns ``(hidden [B, T, D] after the final norm, k_new, v_new [L, B, T, K, Dh])``. Positions
    are absolute: ``cache.lengths[b] + offsets[b]`` (default ``arange(T)``: the block follows the
    prefix) for RoPE and for the llama-4 query scale; structured blocks (quadratic
    self-speculation) place several tokens at the same position.
    ``pattern`` is the block's own visibility (every query sees the row's valid cache prefix);
    ``uniform`` names it when the whole batch shares one static pattern. ``embeddings
    [B, T, D]`` (optional) replace the token embeddings where given (image features of a
    vision-language prompt); ``lora`` / ``lora_gate`` as in :func:`decoder_layer`.
    """
    T = tokens.shape[1]
    dtype = params["embed_tokens"].dtype
    if offsets is None:
        offsets = jnp.arange(T, dtype=jnp.int32)[None, :]
    positions = cache.lengths[:, None] + offsets
    cos, sin = rope_cos_sin(config, positions, dtype)
    q_scale = llama4_query_scale(config, positions)

    def attend(q, k, v, cached):  # this layer's slice of the cache, in the compute dtype (an int8 one dequantized)
        ck, cv, k_scale, v_scale = cached
        ck, cv = dequantize_kv(ck, k_scale, dtype), dequantize_kv(cv, v_scale, dtype)
        return decode_attention(q, k, v, ck, cv, cache.lengths, pattern, uniform=uniform, runtime=runtime)

    x = embed(params, tokens) if embeddings is None else embeddings.astype(dtype)
    x = runtime.constrain(x, _RESIDUAL)
    per_layer = (cache.k, cache.v, cache.k_scale, cache.v_scale)
    x, (k_new, v_new) = scan_layers(params, config, x, cos, sin, q_scale, attend, per_layer, lora, lora_gate,
                                    runtime=runtime)
    return rms_norm(x, params["norm"], config.rms_norm_eps), k_new, v_new


def head_weight(params, config: NLDConfig) -> jax.Array:
    """The LM head as ``[D, V]`` (the embedding, transposed, when tied; quantized or not)."""
    return params["embed_tokens"].T if config.tie_word_embeddings else params["diffusion_head"]


def lm_head(params, config: NLDConfig, hidden: jax.Array, runtime: Runtime = DEFAULT_RUNTIME) -> jax.Array:
    """Logits ``[..., V]`` in float32 (no scaling, no soft-cap)."""
    logits = quant.einsum("...d,dv->...v", hidden, head_weight(params, config), preferred_element_type=jnp.float32)
    if logits.ndim == 3:
        logits = runtime.constrain(logits, ("batch", "seq", "act_vocab"))
    return logits


def greedy_head(params, config: NLDConfig, hidden: jax.Array, *, with_confidence: bool = True,
                runtime: Runtime = DEFAULT_RUNTIME):
    """``(argmax token, its softmax probability or None)`` straight from ``hidden [..., D]``.

    A kernel sees whole rows of the vocabulary and cannot combine vocabulary shards: with the
    head split over the vocabulary the XLA version runs (the partitioner splits it); otherwise
    the kernel runs per batch shard. The kernels take a dense ``[D, V]`` head: a quantized head
    runs the XLA version (logits of the quantized matmul, then argmax), whatever ``runtime`` asks.
    """
    weight = head_weight(params, config)
    if quant.is_quantized(weight):
        logits = lm_head(params, config, hidden, runtime)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if not with_confidence:
            return tokens, None
        return tokens, 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), axis=-1)
    impl = resolve_greedy_head(runtime.implementation, hidden.shape[-1])
    if impl != "xla" and runtime.sharded:
        if mesh_size(runtime.mesh, runtime.rules.mesh_axes("vocab")) > 1:
            impl = "xla"
        else:
            rows = ("batch",) + (None,) * (hidden.ndim - 1)

            def kernel(hidden, weight):
                return _greedy_head(hidden, weight, with_confidence=True, implementation=impl)

            tokens, prob = runtime.shard_kernel(kernel, [rows, None], [rows[:-1], rows[:-1]])(hidden, weight)
            return tokens, (prob if with_confidence else None)
    return _greedy_head(hidden, weight, with_confidence=with_confidence, implementation=impl)


def forward_logits(params, config: NLDConfig, tokens: jax.Array, *, embeddings=None,
                   runtime: Runtime = DEFAULT_RUNTIME) -> jax.Array:
    """Causal logits ``[B, T, V]`` of a forward without cache (positions ``0..T-1``);
    ``embeddings [B, T, D]`` replace the token embeddings when given (images)."""
    B, T = tokens.shape
    empty = KVCache.empty(config, B, 0, params["embed_tokens"].dtype)
    hidden, _, _ = forward_hidden(params, config, tokens, empty, pattern=BlockPattern.causal(B, T),
                                  uniform="causal", embeddings=embeddings, runtime=runtime)
    return lm_head(params, config, hidden, runtime)
