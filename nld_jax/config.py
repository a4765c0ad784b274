"""Model configuration: frozen, hashable dataclasses read from an HF ``config.json``.

The config is a static argument of every jitted function, so it must be hashable and must
hold only what changes the computation. Fields of ``config.json`` fall in three groups:

* ``_ARCH_FIELDS``: read into :class:`NLDConfig`;
* ``_HARMLESS_FIELDS``: known and irrelevant to inference (training knobs, HF bookkeeping);
* ``_REQUIRED_VALUES``: known fields whose only supported value is checked here (biases,
  sliding window, activation...).

Anything else is refused with an error naming the field, so a checkpoint with an
architecture change we do not implement fails loudly instead of producing wrong logits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "NLDConfig",
    "RopeConfig",
    "PRESETS",
    "preset",
    "config_from_hf",
    "config_to_hf",
]


class ConfigError(ValueError):
    """A config.json that this implementation cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (YaRN as NLD ships it, or plain RoPE)."""

    theta: float = 1e6
    rope_type: str = "yarn"  # "yarn" | "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    attention_factor: float | None = None  # explicit override of the cos/sin multiplier
    truncate: bool = True  # floor/ceil of the YaRN correction range (transformers default)
    llama_4_scaling_beta: float | None = 0.1  # query scale 1 + beta*ln(1 + floor(pos / L0))


@dataclasses.dataclass(frozen=True)
class NLDConfig:
    """Architecture of one NLD checkpoint. Dimension names follow STYLE.md (D, F, H, K, Dh, V, L)."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    mask_token_id: int = 100
    bos_token_id: int | None = 1
    eos_token_id: int | None = 11
    block_size: int = 32  # the block length the checkpoint was trained with (decode default)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id={self.mask_token_id} outside vocab_size={self.vocab_size}")

    # Short names in the STYLE.md alphabet, used throughout the model code.
    @property
    def D(self) -> int:
        return self.hidden_size

    @property
    def F(self) -> int:
        return self.intermediate_size

    @property
    def H(self) -> int:
        return self.num_attention_heads

    @property
    def K(self) -> int:
        return self.num_key_value_heads

    @property
    def G(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def Dh(self) -> int:
        return self.head_dim

    @property
    def V(self) -> int:
        return self.vocab_size

    @property
    def L(self) -> int:
        return self.num_hidden_layers

    def num_params(self) -> int:
        D, F, H, K, Dh, V, L = self.D, self.F, self.H, self.K, self.Dh, self.V, self.L
        per_layer = 2 * D + D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
        head = 0 if self.tie_word_embeddings else V * D
        return V * D + L * per_layer + D + head

    def replace(self, **changes) -> "NLDConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------
# Presets: the released checkpoints (NLD_SPEC.md section 1).
# --------------------------------------------------------------------------------------

def _release(hidden, inter, layers, theta) -> NLDConfig:
    return NLDConfig(
        vocab_size=131072,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=262144,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=theta, rope_type="yarn", factor=16.0,
                        original_max_position_embeddings=16384, beta_fast=32.0, beta_slow=1.0,
                        mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
        mask_token_id=100,
        bos_token_id=1,
        eos_token_id=11,
        block_size=32,
    )


PRESETS: dict[str, NLDConfig] = {
    "3b": _release(3072, 9216, 26, 1e6),
    "8b": _release(4096, 14336, 34, 1e6),
    "14b": _release(5120, 16384, 40, 1e9),
}


def preset(name: str) -> NLDConfig:
    key = name.lower().removeprefix("nld-").removesuffix("-base")
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]


# --------------------------------------------------------------------------------------
# Reading config.json
# --------------------------------------------------------------------------------------

_ARCH_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "rope_theta", "rope_scaling", "tie_word_embeddings", "mask_token_id",
    "bos_token_id", "eos_token_id", "block_size",
}

# Known, and irrelevant to the forward pass and decoding.
_HARMLESS_FIELDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "attn_implementation", "_attn_implementation", "use_cache", "initializer_range",
    "pad_token_id", "attention_dropout", "ar_loss_weight", "dlm_loss_weight",
    "dp_varying_mask_ratio", "random_length_prob", "tok_mask_half_life_ratio",
    "adaptive_mask_rate", "global_loss_avg", "ada_perm_ratio_per_block", "ada_dlm_loss_ratio",
    "max_seq_length", "enable_self_spec", "name_or_path", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "problem_type", "id2label", "label2id", "t_bs_min", "t_bs_max",
    "t_window_width", "use_sbd_objective", "layer_types", "generation_config",
}

# Known fields with the one value this implementation supports: value -> predicate.
_REQUIRED_VALUES: dict[str, tuple[str, Any]] = {
    "attention_bias": ("false", lambda v: v in (False, None)),
    "mlp_bias": ("false", lambda v: v in (False, None)),
    "hidden_act": ("silu", lambda v: v in ("silu", "swish")),
    "sliding_window": ("null", lambda v: v is None),
    "use_sliding_window": ("false", lambda v: not v),
    "dlm_type": ("'llada' (unshifted diffusion logits)", lambda v: v in (None, "llada")),
    "dlm_paradigm": ("bidirectional | block_diff | autoregressive",
                     lambda v: v in (None, "bidirectional", "block_diff", "autoregressive")),
    "partial_rotary_factor": ("1.0", lambda v: v in (None, 1, 1.0)),
    "qk_norm": ("false", lambda v: not v),
    "self_spec_inference_mode": ("null", lambda v: v is None),
    "quantization_config": ("absent (quantized checkpoints are not supported)", lambda v: v is None),
    "quantization": ("absent (quantized checkpoints are not supported)", lambda v: v is None),
    "final_logit_softcapping": ("null", lambda v: v is None),
    "attn_logit_softcapping": ("null", lambda v: v is None),
}

_MODEL_TYPES = {"nemotron_labs_diffusion", "ministral_dlm", "ministral_diff", "ministral3"}

_ROPE_KEYS = {
    "rope_theta", "rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "llama_4_scaling_beta",
}


def _rope_from_hf(hf: Mapping[str, Any], max_pos: int) -> RopeConfig:
    # transformers 5 writes everything under rope_parameters; older files put the theta at the
    # top level and the scaling dict in rope_scaling.
    params: dict[str, Any] = {}
    if hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    if hf.get("rope_parameters"):
        params.update(hf["rope_parameters"])
    if "rope_theta" in hf and "rope_theta" not in params:
        params["rope_theta"] = hf["rope_theta"]
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"unsupported rope field(s) {unknown} in config.json")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("yarn", "default"):
        raise ConfigError(f"unsupported rope_type {rope_type!r} (only 'yarn' and 'default')")
    orig = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
    )


def _single_token_id(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        # Several EOS ids: the reference stops on config.eos_token_id compared elementwise,
        # which only works with one id; we take the first and say so in the docs.
        return int(value[0])
    return int(value)


def config_from_hf(hf: Mapping[str, Any]) -> NLDConfig:
    """Build an :class:`NLDConfig` from a parsed HF ``config.json``; refuse what we don't run."""
    hf = dict(hf)
    # Some exports nest the language model config (VLM wrappers); we only handle text models.
    if "text_config" in hf:
        raise ConfigError("config.json has a 'text_config' (a multimodal wrapper); "
                          "only the text-only NLD checkpoints are supported")
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not an NLD model ({sorted(_MODEL_TYPES)})")
    for field, (expected, ok) in _REQUIRED_VALUES.items():
        if field in hf and not ok(hf[field]):
            raise ConfigError(f"config field {field}={hf[field]!r} is not supported (expected {expected})")
    known = _ARCH_FIELDS | _HARMLESS_FIELDS | set(_REQUIRED_VALUES)
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        raise ConfigError(
            f"config.json field(s) {unknown} are not understood by nld_jax; they may change the "
            "architecture, so the checkpoint is refused rather than run wrongly"
        )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing}")

    heads = int(hf["num_attention_heads"])
    max_pos = int(hf.get("max_position_embeddings", 262144))
    return NLDConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        max_position_embeddings=max_pos,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope=_rope_from_hf(hf, max_pos),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mask_token_id=int(hf.get("mask_token_id", 100)),
        bos_token_id=_single_token_id(hf.get("bos_token_id"), "bos_token_id"),
        eos_token_id=_single_token_id(hf.get("eos_token_id"), "eos_token_id"),
        block_size=int(hf.get("block_size") or 32),
    )


def config_to_hf(config: NLDConfig) -> dict[str, Any]:
    """The inverse of :func:`config_from_hf`, in the transformers-5 form NVIDIA ships."""
    r = config.rope
    rope: dict[str, Any] = {"rope_theta": r.theta, "rope_type": r.rope_type}
    if r.rope_type == "yarn":
        rope.update(factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale,
                    mscale_all_dim=r.mscale_all_dim)
        if r.attention_factor is not None:
            rope["attention_factor"] = r.attention_factor
        if not r.truncate:
            rope["truncate"] = False
    if r.llama_4_scaling_beta is not None:
        rope["llama_4_scaling_beta"] = r.llama_4_scaling_beta
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "sliding_window": None,
        "dlm_paradigm": "bidirectional",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "mask_token_id": config.mask_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "block_size": config.block_size,
        "torch_dtype": "bfloat16",
        "transformers_version": "5.0.0",
    }


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The cos/sin multiplier, computed exactly as transformers 5 does (1.0 for NLD)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return float(mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim))
    return mscale(rope.factor)
