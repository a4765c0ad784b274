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


# --------------------------------------------------------------------------------------
# The whole model in numpy float64 (training layout), for the training objectives
# --------------------------------------------------------------------------------------
# Written from the checkpoint's own description (config.json, HF tensor names and layouts,
# PEFT's adapter_config.json) and the training layout NVIDIA documents in the golden cases
# (tests/data/nld-tiny/golden/cases.json, "c_train_block_diff"): nothing of nld_jax is used.
# It is itself checked against NVIDIA's training logits (test_training.py).

_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as float64 / integer arrays: 8-byte little-endian header size, a
    JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data."""
    import json
    import struct

    import ml_dtypes

    raw = open(path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _ST_DTYPES[info["dtype"]]
        x = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(info["shape"])
        out[name] = x.astype(np.float64) if x.dtype.kind == "f" or info["dtype"] == "BF16" else x
    return out


def load_checkpoint(ckpt_dir) -> tuple[dict, dict, dict | None]:
    """``(config.json, {HF name: float64 array}, LoRA or None)`` of an HF-format NLD checkpoint.

    The LoRA is ``{"A": [layer] -> [r, H*Dh], "B": [layer] -> [D, r], "scale": alpha / r}`` from
    ``linear_spec_lora/`` (PEFT, target o_proj, no rslora)."""
    import json
    import pathlib

    ckpt_dir = pathlib.Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    weights = read_safetensors(ckpt_dir / "model.safetensors")
    lora = None
    if (ckpt_dir / "linear_spec_lora").is_dir():
        adapter = json.loads((ckpt_dir / "linear_spec_lora" / "adapter_config.json").read_text())
        assert adapter["target_modules"] == ["o_proj"] and not adapter.get("use_rslora")
        tensors = read_safetensors(ckpt_dir / "linear_spec_lora" / "adapter_model.safetensors")
        prefix = "base_model.model.encoder.layers.{}.self_attn.o_proj.lora_{}.weight"
        n = config["num_hidden_layers"]
        lora = {"A": [tensors[prefix.format(i, "A")] for i in range(n)],
                "B": [tensors[prefix.format(i, "B")] for i in range(n)],
                "scale": adapter["lora_alpha"] / adapter["r"]}
    return config, weights, lora


def yarn_inverse_frequencies(config: dict) -> tuple[np.ndarray, float]:
    """``(inv_freq [Dh/2], attention_factor)`` of transformers' YaRN (``_compute_yarn_parameters``), float64."""
    import math

    rope = config["rope_parameters"]
    dim = config["head_dim"]
    base = rope["rope_theta"]
    freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope["rope_type"] == "default":
        return 1.0 / freqs, 1.0
    assert rope["rope_type"] == "yarn", rope
    factor = rope["factor"]
    original = rope.get("original_max_position_embeddings") or config["max_position_embeddings"]
    if "original_max_position_embeddings" in rope:
        factor = config["max_position_embeddings"] / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv = (1.0 / (factor * freqs)) * (1 - extrapolation) + (1.0 / freqs) * extrapolation
    return inv, float(attention_factor)


def block_diff_visible(L: int, block: int) -> np.ndarray:
    """``[2L, 2L]`` visibility of the ``[noisy | clean]`` training layout, as the golden cases
    state it: noisy -> noisy in the same block; noisy -> clean in a strictly earlier block;
    clean -> clean causally; clean -> noisy never (``block(i) = (i mod L) // block``)."""
    out = np.zeros((2 * L, 2 * L), bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qb, kb = (q % L) // block, (k % L) // block
            if q < L:
                out[q, k] = qb == kb if k < L else qb > kb
            else:
                out[q, k] = k >= L and k <= q
    return out


def train_logits(config: dict, weights: dict, noisy, clean, block: int, lora: dict | None = None,
                 lora_on_noisy_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy-half logits [B, L, V], clean-half logits [B, L, V])`` in float64 of NVIDIA's training
    forward: RoPE positions ``0..L-1`` in each half, the llama-4 query scale at positions
    ``0..2L-1``, ``block_diff_visible``; the LoRA (if given) on o_proj, of the noisy half only."""
    noisy, clean = np.asarray(noisy), np.asarray(clean)
    B, L = clean.shape
    H, K, Dh = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps = config["rms_norm_eps"]
    tokens = np.concatenate([noisy, clean], axis=1)
    x = weights["encoder.embed_tokens.weight"][tokens]  # [B, 2L, D]

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    inv, attention_factor = yarn_inverse_frequencies(config)
    pos = np.concatenate([np.arange(L), np.arange(L)]).astype(np.float64)
    angles = pos[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], axis=-1)  # [2L, Dh]
    cos, sin = np.cos(angles) * attention_factor, np.sin(angles) * attention_factor

    def rope(v):  # [B, 2L, N, Dh], rotate-half layout
        half = Dh // 2
        rotated = np.concatenate([-v[..., half:], v[..., :half]], axis=-1)
        return v * cos[None, :, None, :] + rotated * sin[None, :, None, :]

    beta = config["rope_parameters"].get("llama_4_scaling_beta")
    L0 = config["rope_parameters"].get("original_max_position_embeddings") or config["max_position_embeddings"]
    q_scale = 1.0 + beta * np.log(1.0 + np.floor(np.arange(2 * L) / L0)) if beta else np.ones(2 * L)
    visible = block_diff_visible(L, block)
    gate = np.concatenate([np.ones(L), np.zeros(L) if lora_on_noisy_only else np.ones(L)])
    for i in range(config["num_hidden_layers"]):
        prefix = f"encoder.layers.{i}."
        w = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        h = norm(x, w["input_layernorm.weight"])
        q = rope((h @ w["self_attn.q_proj.weight"].T).reshape(B, 2 * L, H, Dh)) * q_scale[None, :, None, None]
        k = rope((h @ w["self_attn.k_proj.weight"].T).reshape(B, 2 * L, K, Dh))
        v = (h @ w["self_attn.v_proj.weight"].T).reshape(B, 2 * L, K, Dh)
        out, _ = masked_attention(q, k, v, visible)
        out = out.reshape(B, 2 * L, H * Dh)
        o = out @ w["self_attn.o_proj.weight"].T
        if lora is not None:
            o = o + gate[None, :, None] * lora["scale"] * ((out @ lora["A"][i].T) @ lora["B"][i].T)
        x = x + o
        h = norm(x, w["post_attention_layernorm.weight"])
        g, u = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
        x = x + (g / (1.0 + np.exp(-g)) * u) @ w["mlp.down_proj.weight"].T
    x = norm(x, weights["encoder.norm.weight"])
    tied = config.get("tie_word_embeddings")
    head = weights["encoder.embed_tokens.weight"] if tied else weights["diffusion_head.weight"]
    logits = x @ head.T
    return logits[:, :L], logits[:, L:]


def cross_entropy(logits, targets) -> np.ndarray:
    """``-log softmax(logits)[target]`` per position, float64."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return logz - np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]


def draft_loss(config: dict, weights: dict, lora: dict, tokens, block: int) -> tuple[float, float]:
    """``(loss, accuracy)`` of the draft-LoRA objective, from its description: in every block the
    first token is given and the others are MASK (the inference-time draft); the noisy half runs
    with the adapter, the clean half (the causal cache at inference) without; mean cross-entropy
    of the noisy half's logits against the tokens over the masked slots, and the fraction of them
    whose argmax is the token."""
    tokens = np.asarray(tokens)
    B, L = tokens.shape
    masked = np.broadcast_to(np.arange(L) % block != 0, (B, L))
    noisy = np.where(masked, config["mask_token_id"], tokens)
    logits, _ = train_logits(config, weights, noisy, tokens, block, lora=lora, lora_on_noisy_only=True)
    ce = cross_entropy(logits, tokens)
    accuracy = ((logits.argmax(-1) == tokens) & masked).sum() / masked.sum()
    return float(ce[masked].mean()), float(accuracy)
