"""NLD's joint AR + block-diffusion training objective (NLD_SPEC.md sections 4 and 6).

The encoder input is ``[x_t (noisy, L) | x_0 (clean, L)]``. RoPE uses positions ``0..L-1`` for
each half; the llama-4 query scale uses ``0..2L-1`` (NVIDIA's behaviour). The ``block_diff``
mask lets the noisy half see its own block and strictly earlier clean blocks, and the clean
half see itself causally. The noisy half yields unshifted diffusion logits (position i predicts
token i); the clean half yields causal logits (position i predicts token i+1).

Losses follow NVIDIA's HF forward: ``loss_sum = dlm_weight * sum_masked CE / p + ar_weight *
sum CE_ar`` and ``loss_count = n_masked + int(ar_weight * L)`` (L, not B*L: NVIDIA's formula),
and training minimises ``loss_sum / loss_count``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nld_jax.attention import block_diff_attention
from nld_jax.config import NLDConfig
from nld_jax.model import embed, lm_head, rms_norm, scan_layers
from nld_jax.rope import llama4_query_scale, rope_cos_sin
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime

__all__ = ["LossConfig", "mask_tokens", "train_hidden", "nld_loss", "draft_loss", "draft_mask"]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    dlm_weight: float = 0.3  # alpha; the shipped config has dlm_loss_weight null: 0.3 is NVIDIA's recipe
    ar_weight: float = 1.0
    eps: float = 1e-3  # p = (1 - eps) * t + eps
    remat: bool = False  # recompute layer activations in the backward pass (memory for compute)


def mask_tokens(key: jax.Array, tokens: jax.Array, eps: float, loss_mask: jax.Array | None = None):
    """NVIDIA's forward process: per row ``t ~ U(0,1)``, ``p = (1-eps) t + eps``, each token masked
    with probability p; tokens outside ``loss_mask`` (SFT prompts) are never masked.

    Returns ``(masked [B, L] bool, p_mask [B, L] float32)``.
    """
    kt, km = jax.random.split(key)
    B, L = tokens.shape
    t = jax.random.uniform(kt, (B,))
    p = jnp.broadcast_to(((1 - eps) * t + eps)[:, None], (B, L))
    masked = jax.random.uniform(km, (B, L)) < p
    if loss_mask is not None:
        masked = masked & (loss_mask > 0)
    return masked, p


def train_hidden(params, config: NLDConfig, noisy: jax.Array, clean: jax.Array, block_length, *, lora=None,
                 lora_gate=None, remat: bool = False, runtime: Runtime = DEFAULT_RUNTIME, embeddings=None):
    """Final hidden states ``[B, 2L, D]`` of the ``[noisy | clean]`` layout.

    The attention is :func:`nld_jax.attention.block_diff_attention` with ``runtime``'s
    implementation: XLA (the structured form when ``block_length`` is a static int dividing L,
    the dense mask when it is traced) or a block-sparse Pallas kernel. ``lora_gate [B, 2L]``
    switches the adapter per token. ``embeddings [B, L, D]`` (optional) are the clean input's
    embeddings (image features spliced in, :func:`nld_jax.vision.features.splice_features`): the
    clean half takes them, the noisy half too except where a token was masked (there the mask
    token's embedding), so unmasked image positions carry their features in both halves.
    """
    B, L = clean.shape
    tokens = jnp.concatenate([noisy, clean], axis=1)
    dtype = params["embed_tokens"].dtype
    rope_pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(L), jnp.arange(L)])[None], (B, 2 * L))
    cos, sin = rope_cos_sin(config, rope_pos, dtype)
    q_scale = llama4_query_scale(config, jnp.broadcast_to(jnp.arange(2 * L)[None], (B, 2 * L)))

    def attend(q, k, v, _):
        return block_diff_attention(q, k, v, block_length, runtime=runtime)

    x = embed(params, tokens)
    if embeddings is not None:
        kept = jnp.concatenate([noisy == clean, jnp.ones_like(clean, dtype=bool)], axis=1)
        x = jnp.where(kept[..., None], jnp.concatenate([embeddings, embeddings], axis=1).astype(x.dtype), x)
    x = runtime.constrain(x, ("batch", "seq", "act_embed"))
    x, _ = scan_layers(params, config, x, cos, sin, q_scale, attend, None, lora, lora_gate, remat, runtime)
    return rms_norm(x, params["norm"], config.rms_norm_eps)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def nld_loss(params, config: NLDConfig, tokens: jax.Array, masked: jax.Array, p_mask: jax.Array, block_length,
             loss: LossConfig = LossConfig(), ar_mask: jax.Array | None = None, runtime: Runtime = DEFAULT_RUNTIME,
             embeddings: jax.Array | None = None):
    """NVIDIA's joint objective on ``tokens [B, L]`` with the given masking.

    ``ar_mask [B, L]`` (optional, SFT) marks the tokens that count as AR targets (position i's
    target is token i+1, so ``ar_mask[:, 1:]`` weighs the shifted CE). ``embeddings [B, L, D]``
    (optional, a vision-language prompt): the input embeddings of ``tokens`` (see
    :func:`train_hidden`); the image positions must be outside ``masked`` (keep them out of the
    loss mask, as SFT prompts are).
    Returns ``(loss_sum, loss_count, aux)``; ``aux`` holds the logits and the loss parts.
    """
    B, L = tokens.shape
    noisy = jnp.where(masked, config.mask_token_id, tokens)
    hidden = train_hidden(params, config, noisy, tokens, block_length, remat=loss.remat, runtime=runtime,
                          embeddings=embeddings)
    logits = lm_head(params, config, hidden[:, :L], runtime)
    causal_logits = lm_head(params, config, hidden[:, L:], runtime)
    ce_diff = _cross_entropy(logits, tokens)
    diff_sum = jnp.sum(jnp.where(masked, ce_diff / p_mask, 0.0))
    ce_ar = _cross_entropy(causal_logits[:, :-1], tokens[:, 1:])
    if ar_mask is not None:
        ce_ar = ce_ar * ar_mask[:, 1:]
    ar_sum = jnp.sum(ce_ar)
    n_masked = jnp.sum(masked)
    loss_sum = loss.dlm_weight * diff_sum + loss.ar_weight * ar_sum
    loss_count = n_masked + int(loss.ar_weight * L)
    aux = {"logits": logits, "causal_logits": causal_logits, "diffusion_sum": diff_sum, "ar_sum": ar_sum,
           "n_masked": n_masked}
    return loss_sum, loss_count, aux


def draft_mask(L: int, block_length) -> jax.Array:
    """The self-speculation draft: in every block, the first token is known, the rest masked."""
    return (jnp.arange(L) % block_length) != 0


def draft_loss(lora, params, config: NLDConfig, tokens: jax.Array, block_length, remat: bool = False,
               loss_mask: jax.Array | None = None, runtime: Runtime = DEFAULT_RUNTIME):
    """Draft-LoRA objective: mean CE of the bidirectional draft (adapter on) at masked slots.

    As at inference, the adapter runs on the noisy (draft) half only; the clean half, which
    plays the role of the causal KV cache, is computed without it.
    """
    B, L = tokens.shape
    masked = jnp.broadcast_to(draft_mask(L, block_length)[None], (B, L))
    if loss_mask is not None:
        masked = masked & (loss_mask > 0)
    noisy = jnp.where(masked, config.mask_token_id, tokens)
    gate = jnp.broadcast_to(jnp.concatenate([jnp.ones((L,)), jnp.zeros((L,))])[None], (B, 2 * L))
    hidden = train_hidden(params, config, noisy, tokens, block_length, lora=lora, lora_gate=gate, remat=remat,
                          runtime=runtime)
    logits = lm_head(params, config, hidden[:, :L], runtime)
    ce = _cross_entropy(logits, tokens)
    n = jnp.maximum(jnp.sum(masked), 1)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == tokens) & masked) / n
    return jnp.sum(jnp.where(masked, ce, 0.0)) / n, {"draft_accuracy": accuracy}
