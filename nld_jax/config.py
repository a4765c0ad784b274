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

def _is_false(v) -> bool:
    return v is None or v is False


# Known fields with the one value this implementation supports: value -> predicate.
_REQUIRED_VALUES: dict[str, tuple[str, Any]] = {
    "attention_bias": ("false", _is_false),
    "mlp_bias": ("false", _is_false),
    "hidden_act": ("silu", lambda v: v in ("silu", "swish")),
    "sliding_window": ("null", lambda v: v is None),
    "use_sliding_window": ("false", _is_false),
    "dlm_type": ("'llada' (unshifted diffusion logits)", lambda v: v in (None, "llada")),
    "dlm_paradigm": ("bidirectional | block_diff | autoregressive",
                     lambda v: v in (None, "bidirectional", "block_diff", "autoregressive")),
    "partial_rotary_factor": ("1.0", lambda v: v is None or (_is_number(v) and v == 1)),
    "qk_norm": ("false", _is_false),
    "self_spec_inference_mode": ("null", lambda v: v is None),
    "quantization_config": ("absent (quantized checkpoints are not supported)", lambda v: v is None),
    "quantization": ("absent (quantized checkpoints are not supported)", lambda v: v is None),
    "final_logit_softcapping": ("null", lambda v: v is None),
    "attn_logit_softcapping": ("null", lambda v: v is None),
}

_MODEL_TYPES = {"nemotron_labs_diffusion", "ministral_dlm", "ministral_diff", "ministral3",
                "nemotron_labs_diffusion_vlm"}

# The vision half of a VLM config.json (NVIDIA's keeps the text fields at the root): read and
# checked by nld_jax.vision.config, not part of the text model.
VLM_FIELDS = {"vision_config", "spatial_merge_size", "projector_hidden_act", "multimodal_projector_bias",
              "vision_feature_layer", "image_token_id", "image_token_index", "image_break_token_id",
              "image_end_token_id"}

_ROPE_KEYS = {
    "rope_theta", "rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "llama_4_scaling_beta",
}

# Ranges of the integer fields: wide enough for any real NLD (the 14B: L 40, D 5120, V 131072,
# 256k positions), narrow enough that no config can make nld-jax plan absurd arrays.
_INT_RANGES = {
    "vocab_size": (1, 2**24),
    "hidden_size": (1, 2**16),
    "intermediate_size": (1, 2**20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 2048),
    "max_position_embeddings": (1, 2**24),
    "original_max_position_embeddings": (1, 2**24),
    "block_size": (1, 2**16),
}
_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(hf: Mapping[str, Any], name: str, default=_MISSING, *, null_is_default: bool = False) -> int:
    """Integer field ``name``: a JSON integer (not 8.0, "8" or true) inside ``_INT_RANGES``."""
    value = hf.get(name, default)
    if value is None and null_is_default and default is not _MISSING:
        value = default
    lo, hi = _INT_RANGES[name]
    if not _is_int(value) or not lo <= value <= hi:
        raise ConfigError(f"config field {name}={value!r:.80} must be an integer in [{lo}, {hi}]")
    return value


def _number(params: Mapping[str, Any], name: str, default, *, positive: bool = False, at_least: float | None = None,
            nullable: bool = False, above: float | None = None) -> float | None:
    """Number field ``name``: a finite JSON number (not a string or a bool), in range."""
    value = params.get(name, default)
    if value is None:
        if nullable:
            return None
        value = default
    if not _is_number(value) or (positive and value <= 0) or (at_least is not None and value < at_least) \
            or (above is not None and value <= above):
        bound = (f" > {above}" if above is not None else " > 0" if positive else
                 f" >= {at_least}" if at_least is not None else "")
        raise ConfigError(f"config field {name}={value!r:.80} must be a finite number{bound}")
    return value


def _rope_from_hf(hf: Mapping[str, Any], max_pos: int) -> RopeConfig:
    # transformers 5 writes everything under rope_parameters; older files put the theta at the
    # top level and the scaling dict in rope_scaling.
    params: dict[str, Any] = {}
    for field in ("rope_scaling", "rope_parameters"):
        value = hf.get(field)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config field {field} must be an object or null, got {type(value).__name__}")
        clash = sorted(k for k, v in (value or {}).items() if k in params and params[k] != v)
        if clash:
            raise ConfigError(f"config fields rope_scaling and rope_parameters disagree on {clash}: "
                              "give one value for each")
        params.update(value or {})
    if "rope_theta" in hf and "rope_theta" not in params:
        params["rope_theta"] = hf["rope_theta"]
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"unsupported rope field(s) {unknown} in config.json")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("yarn", "default"):
        raise ConfigError(f"unsupported rope_type {rope_type!r:.80} (only 'yarn' and 'default')")
    orig = _int(params, "original_max_position_embeddings", max_pos, null_is_default=True)
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    factor = _number({"factor": factor}, "factor", None, at_least=1.0 if rope_type == "yarn" else None, positive=True)
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"config field truncate={truncate!r:.80} must be true or false")
    return RopeConfig(
        # log(theta) divides the YaRN correction range: theta must be above 1.
        theta=float(_number(params, "rope_theta", 10000.0, above=1.0)),
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=orig,
        beta_fast=float(_number(params, "beta_fast", 32.0, positive=True)),
        beta_slow=float(_number(params, "beta_slow", 1.0, positive=True)),
        mscale=_number(params, "mscale", None, nullable=True),
        mscale_all_dim=_number(params, "mscale_all_dim", None, nullable=True),
        attention_factor=_number(params, "attention_factor", None, nullable=True, positive=True),
        truncate=truncate,
        llama_4_scaling_beta=_number(params, "llama_4_scaling_beta", None, nullable=True, at_least=0.0),
    )


def _token_id(hf: Mapping[str, Any], name: str, vocab: int) -> int | None:
    """A special token id (``bos_token_id``, ``eos_token_id``): null, an id inside the vocabulary,
    or a list of them."""
    value = hf.get(name)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise ConfigError(f"config field {name}={value!r:.80} must be null, a token id in [0, {vocab}) "
                          "or a list of them")
    # Several EOS ids: the reference stops on config.eos_token_id compared elementwise, which
    # only works with one id; we take the first and say so in the docs.
    return ids[0] if ids else None


def config_from_hf(hf: Mapping[str, Any]) -> NLDConfig:
    """Build an :class:`NLDConfig` from a parsed HF ``config.json``; refuse what we don't run.

    Every field the model uses is checked for type and range (an error names the field and the
    value); :func:`nld_jax.checkpoint.directory.load_hf_config` adds the file."""
    if not isinstance(hf, Mapping):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    hf = dict(hf)
    # Some exports nest the language model config (VLM wrappers); we only handle text models.
    if "text_config" in hf:
        raise ConfigError("config.json has a 'text_config' (a multimodal wrapper); "
                          "only the text-only NLD checkpoints are supported")
    model_type = hf.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in _MODEL_TYPES):
        raise ConfigError(f"model_type {model_type!r:.80} is not an NLD model ({sorted(_MODEL_TYPES)})")
    for field, (expected, ok) in _REQUIRED_VALUES.items():
        if field in hf and not ok(hf[field]):
            raise ConfigError(f"config field {field}={hf[field]!r:.80} is not supported (expected {expected})")
    known = _ARCH_FIELDS | _HARMLESS_FIELDS | set(_REQUIRED_VALUES) | VLM_FIELDS
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

    vocab, hidden = _int(hf, "vocab_size"), _int(hf, "hidden_size")
    heads = _int(hf, "num_attention_heads")
    kv_heads = _int(hf, "num_key_value_heads", heads, null_is_default=True)
    if heads % kv_heads:
        raise ConfigError(f"config field num_key_value_heads={kv_heads} must divide num_attention_heads={heads}")
    if hf.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"config lacks head_dim and num_attention_heads={heads} does not divide "
                          f"hidden_size={hidden}")
    head_dim = _int(hf, "head_dim", hidden // heads, null_is_default=True)
    if head_dim % 2:
        raise ConfigError(f"config field head_dim={head_dim} must be even (rotary embeddings rotate pairs)")
    max_pos = _int(hf, "max_position_embeddings", 262144)
    tie = hf.get("tie_word_embeddings", False)
    if tie is None:
        tie = False
    if not isinstance(tie, bool):
        raise ConfigError(f"config field tie_word_embeddings={tie!r:.80} must be true or false")
    mask = hf.get("mask_token_id", 100)
    if not _is_int(mask) or not 0 <= mask < vocab:
        raise ConfigError(f"config field mask_token_id={mask!r:.80} must be a token id in [0, {vocab})")
    return NLDConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(hf, "intermediate_size"),
        num_hidden_layers=_int(hf, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(_number(hf, "rms_norm_eps", 1e-5, positive=True)),
        rope=_rope_from_hf(hf, max_pos),
        tie_word_embeddings=tie,
        mask_token_id=mask,
        bos_token_id=_token_id(hf, "bos_token_id", vocab),
        eos_token_id=_token_id(hf, "eos_token_id", vocab),
        block_size=_int(hf, "block_size", 32, null_is_default=True),
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
