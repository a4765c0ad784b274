"""The Pixtral vision tower as pure functions of (weights, packed patches).

Images of different sizes are packed into one sequence of ``N`` patches (see
:mod:`nld_jax.vision.packing`): each patch carries its row and column inside its image (for the
2-D RoPE) and its image's index (``segments``); attention is block-diagonal over images, exactly
Pixtral's ``generate_block_attention_mask``. Padding patches carry segment -1: they attend only
to each other, so they never touch a real patch and never produce NaN. The patch embedding is
Pixtral's stride-P convolution, which on non-overlapping patches is one matmul.

Shapes: ``N`` packed patches, ``C`` = 3 channels, ``P`` patch size, ``Dv`` hidden, ``Hv`` heads,
``Dhv`` head dim, ``Fv`` MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nld_jax.model import rms_norm
from nld_jax.rope import apply_rope
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime
from nld_jax.vision.config import VisionConfig

__all__ = ["patch_embed", "rope_2d", "encoder_layer", "encode"]

# Pixtral's RMSNorms (ln_pre, attention_norm, ffn_norm) use a fixed eps, not a config field.
_EPS = 1e-5
_X = ("seq", "act_embed")
_HEADS = ("seq", "act_heads", "head_dim")
_MLP = ("seq", "act_mlp")


def patch_embed(params, patches: jax.Array) -> jax.Array:
    """``patches [N, C, P, P]`` (pixels) -> ``[N, Dv]``: the stride-P conv as one contraction."""
    w = params["patch_conv"]
    return jnp.einsum("ncij,cijd->nd", patches.astype(w.dtype), w)


def rope_2d(config: VisionConfig, rows: jax.Array, cols: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Pixtral's axial RoPE: ``cos, sin [N, Dhv]`` in the rotate-half layout.

    The ``Dhv / 2`` frequencies of a 1-D RoPE are dealt alternately to rows and columns (even
    ones rotate by the patch row, odd ones by its column), so every pair of the head dimension
    is rotated, by one of the two coordinates."""
    dh = config.Dhv
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    angles = jnp.concatenate([rows[:, None].astype(jnp.float32) * inv_freq[0::2],
                              cols[:, None].astype(jnp.float32) * inv_freq[1::2]], axis=-1)  # [N, Dhv/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


# Queries per attention chunk: the scores of one chunk are [Hv, chunk, N] float32, so a 1540 x
# 1540 image (12,100 patches, bucket 16,384) at 16 heads takes 1 GiB per chunk, not 16.
QUERY_CHUNK = 1024


def _attention(q, k, v, segments) -> jax.Array:
    """Block-diagonal attention over images: ``[N, Hv, Dhv]`` each, softmax in float32, queries in
    chunks of :data:`QUERY_CHUNK` (``N`` is a power of two, so chunks tile it exactly)."""
    scale = q.shape[-1] ** -0.5

    def chunk(args):
        q_c, seg_c = args
        scores = jnp.einsum("nhk,mhk->hnm", q_c, k, preferred_element_type=jnp.float32) * scale
        same = seg_c[:, None] == segments[None, :]
        scores = jnp.where(same[None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("hnm,mhk->nhk", probs, v)

    n = q.shape[0]
    size = min(n, QUERY_CHUNK)
    if n % size:  # not a packed bucket: one chunk
        return chunk((q, segments))
    out = lax.map(chunk, (q.reshape(n // size, size, *q.shape[1:]), segments.reshape(n // size, size)))
    return out.reshape(q.shape)


def _activation(name: str):
    return jax.nn.silu if name == "silu" else lambda x: jax.nn.gelu(x, approximate=False)


def encoder_layer(config: VisionConfig, layer, x: jax.Array, cos, sin, segments,
                  runtime: Runtime = DEFAULT_RUNTIME) -> jax.Array:
    """One Pixtral layer: pre-norm attention with 2-D RoPE, then a pre-norm gated MLP (SiLU in
    NVIDIA's and Mistral's checkpoints)."""
    attn, mlp = layer["attention"], layer["feed_forward"]
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["attention_norm"], _EPS)
        q = runtime.constrain(jnp.einsum("nd,dhk->nhk", h, attn["q_proj"]), _HEADS)
        k = runtime.constrain(jnp.einsum("nd,dhk->nhk", h, attn["k_proj"]), _HEADS)
        v = runtime.constrain(jnp.einsum("nd,dhk->nhk", h, attn["v_proj"]), _HEADS)
        # apply_rope works on [B, T, heads, Dh]: the packed sequence is one row.
        q = apply_rope(q[None], cos[None], sin[None])[0]
        k = apply_rope(k[None], cos[None], sin[None])[0]
        out = _attention(q, k, v, segments)
        x = runtime.constrain(x + jnp.einsum("nhk,hkd->nd", out, attn["o_proj"]), _X)
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer["ffn_norm"], _EPS)
        gate = runtime.constrain(jnp.einsum("nd,df->nf", h, mlp["gate_proj"]), _MLP)
        up = runtime.constrain(jnp.einsum("nd,df->nf", h, mlp["up_proj"]), _MLP)
        act = _activation(config.hidden_act)
        x = runtime.constrain(x + jnp.einsum("nf,fd->nd", act(gate) * up, mlp["down_proj"]), _X)
    return x


def encode(params, config: VisionConfig, patches: jax.Array, rows: jax.Array, cols: jax.Array,
           segments: jax.Array, runtime: Runtime = DEFAULT_RUNTIME) -> jax.Array:
    """The tower's last hidden state ``[N, Dv]`` (``vision_feature_layer -1``; Pixtral has no
    final norm) for packed ``patches [N, C, P, P]`` at ``rows, cols, segments [N]``.

    ``params`` is the ``tower`` subtree of the vision weights."""
    dtype = params["ln_pre"].dtype
    x = rms_norm(patch_embed(params, patches), params["ln_pre"], _EPS)
    x = runtime.constrain(x, _X)
    cos, sin = rope_2d(config, rows, cols, dtype)

    def body(x, layer):
        return encoder_layer(config, layer, x, cos, sin, segments, runtime), None

    x, _ = lax.scan(body, x, params["layers"])
    return x
