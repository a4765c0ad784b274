"""Rotary position embeddings (YaRN, as transformers 5 computes them) and the llama-4 query scale.

Everything here follows the float32 arithmetic of the PyTorch reference: inverse frequencies
are computed once on the host in float32, angles are ``position * inv_freq`` in float32 and
cos/sin are cast to the compute dtype only at the end.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nld_jax.config import NLDConfig, RopeConfig, yarn_attention_factor

__all__ = ["inverse_frequencies", "rope_cos_sin", "apply_rope", "llama4_query_scale"]


def _yarn_correction_range(rope: RopeConfig, dim: int) -> tuple[float, float]:
    def correction_dim(num_rotations: float) -> float:
        L0 = rope.original_max_position_embeddings
        return (dim * math.log(L0 / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """``inv_freq [Dh/2]`` in float32 (NLD_SPEC.md section 3)."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    if rope.rope_type != "yarn":
        return (np.float32(1.0) / pos_freqs).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
    low, high = _yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference does
    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    ramp = np.clip(ramp, 0, 1).astype(np.float32)
    extrapolation_factor = np.float32(1) - ramp
    inv_freq = interpolation * (np.float32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32)


def rope_cos_sin(config: NLDConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin ``[B, T, Dh]`` for absolute ``positions [B, T]`` (tiled ``[freqs, freqs]``)."""
    inv_freq = jnp.asarray(inverse_frequencies(config.rope, config.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    factor = yarn_attention_factor(config.rope)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """``x [B, T, N, Dh]`` rotated in the rotate-half layout: ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def llama4_query_scale(config: NLDConfig, positions: jnp.ndarray) -> jnp.ndarray | None:
    """``1 + beta * ln(1 + floor(pos / L0))`` as ``[B, T]`` float32, or None when disabled."""
    beta = config.rope.llama_4_scaling_beta
    if not beta:
        return None
    L0 = config.rope.original_max_position_embeddings
    pos = positions.astype(jnp.float32)
    return 1.0 + beta * jnp.log(1.0 + jnp.floor(pos / L0))
