"""The vision half of a VLM ``config.json``: the Pixtral tower, the Mistral3 projector and the
image placeholder tokens, as one frozen, hashable :class:`VisionConfig` (a static jit argument).

NVIDIA's VLM config keeps the text fields at the root (read by :func:`nld_jax.config.config_from_hf`,
which knows the fields below as belonging to this module) and adds a ``vision_config`` object
(``model_type "pixtral"``) plus the projector fields. As for the text model, every field is either
read, known to be irrelevant, or pinned to the one value we implement; anything else is refused by
name rather than run wrongly.

The image placeholder id is not certain from public material (131072 by NVIDIA's vocabulary
size, 10 = ``[IMG]`` by the Mistral convention), so it is never guessed: it comes from
``image_token_id`` / ``image_token_index``, else from the tokenizer's ``[IMG]`` token (see
:func:`nld_jax.vision.tokens.resolve_image_tokens`), else the checkpoint is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from nld_jax.config import ConfigError

__all__ = ["VisionConfig", "VLM_MODEL_TYPES", "resolve_image_tokens", "is_vlm_config", "vision_config_from_hf", "vision_config_to_hf",
           "CLIP_MEAN", "CLIP_STD"]

VLM_MODEL_TYPES = {"nemotron_labs_diffusion_vlm"}

# CLIP's normalisation constants, as Pixtral's image processor uses them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# vision_config fields: read / harmless / pinned.
_VISION_READ = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "patch_size", "image_size", "rope_theta", "rope_parameters", "num_channels", "hidden_act"}
_VISION_HARMLESS = {"model_type", "attention_dropout", "initializer_range", "torch_dtype", "dtype",
                    "transformers_version", "_name_or_path", "name_or_path", "architectures", "_attn_implementation",
                    "attn_implementation", "id2label", "label2id", "return_dict", "output_attentions",
                    "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
                    "tokenizer_class"}

_INT_RANGES = {"hidden_size": (1, 2**16), "intermediate_size": (1, 2**20), "num_hidden_layers": (1, 1024),
               "num_attention_heads": (1, 1024), "head_dim": (2, 2048), "patch_size": (1, 1024),
               "image_size": (1, 2**16), "num_channels": (3, 3), "spatial_merge_size": (1, 64),
               "token_id": (0, 2**24)}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Pixtral tower + Mistral3 projector. Dimensions: Dv vision hidden, Hv heads, Dhv head dim,
    Fv MLP width, Lv layers, P patch size, M spatial merge size, D the text hidden size."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    head_dim: int = 64
    patch_size: int = 14
    image_size: int = 1540  # vision_config.image_size: the longest edge, unless max_image_size says otherwise
    # preprocessor_config.json's size.longest_edge (nld_jax.load reads it), which wins over image_size
    max_image_size: int | None = None
    rope_theta: float = 10000.0
    hidden_act: str = "silu"  # the gate's activation: "silu" or "gelu" (exact)
    spatial_merge_size: int = 2
    text_hidden_size: int = 4096
    projector_eps: float = 1e-5  # the projector's RMSNorm takes the text model's rms_norm_eps
    image_token_id: int | None = None
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None

    @property
    def Dv(self) -> int:
        return self.hidden_size

    @property
    def Fv(self) -> int:
        return self.intermediate_size

    @property
    def Hv(self) -> int:
        return self.num_attention_heads

    @property
    def Dhv(self) -> int:
        return self.head_dim

    @property
    def Lv(self) -> int:
        return self.num_hidden_layers

    @property
    def longest_edge(self) -> int:
        """The longest edge an image is resized to at most."""
        return self.image_size if self.max_image_size is None else self.max_image_size

    @property
    def merged_patch(self) -> int:
        """Pixels per side of one image token (a merged patch): what image sides are rounded to."""
        return self.patch_size * self.spatial_merge_size


def is_vlm_config(hf: Mapping[str, Any]) -> bool:
    return hf.get("model_type") in VLM_MODEL_TYPES or "vision_config" in hf


def _int(where: Mapping[str, Any], name: str, default: Any = None, kind: str | None = None) -> int:
    value = where.get(name, default)
    lo, hi = _INT_RANGES[kind or name]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"config field {name}={value!r:.80} must be an integer in [{lo}, {hi}]")
    return value


def _token(hf: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        if hf.get(name) is not None:
            return _int(hf, name, kind="token_id")
    return None


def vision_config_from_hf(hf: Mapping[str, Any], text_hidden_size: int, text_rms_norm_eps: float) -> VisionConfig:
    """The :class:`VisionConfig` of a VLM ``config.json`` (its text half already read)."""
    vc = hf.get("vision_config")
    if not isinstance(vc, Mapping):
        raise ConfigError(f"config field vision_config must be an object (the Pixtral tower), got "
                          f"{type(vc).__name__}")
    if vc.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"vision_config.model_type={vc.get('model_type')!r:.80} is not supported (only 'pixtral')")
    unknown = sorted(k for k in vc if k not in _VISION_READ | _VISION_HARMLESS)
    if unknown:
        raise ConfigError(f"vision_config field(s) {unknown} are not understood by nld_jax; refusing the checkpoint "
                          "rather than running it wrongly")
    # Absent means transformers' PixtralVisionConfig default ("gelu"); NVIDIA's and Mistral's configs say "silu".
    act = {"swish": "silu"}.get(vc.get("hidden_act", "gelu"), vc.get("hidden_act", "gelu"))
    if act not in ("silu", "gelu"):
        raise ConfigError(f"vision_config.hidden_act={vc['hidden_act']!r:.80} is not supported ('silu' or 'gelu')")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"config field projector_hidden_act={hf['projector_hidden_act']!r:.80} is not supported "
                          "(expected 'gelu')")
    if hf.get("multimodal_projector_bias") not in (None, False):
        raise ConfigError("config field multimodal_projector_bias=true is not supported (expected false)")
    if hf.get("vision_feature_layer", -1) != -1:
        raise ConfigError(f"config field vision_feature_layer={hf['vision_feature_layer']!r:.80} is not supported "
                          "(only -1, the tower's last layer)")
    hidden, heads = _int(vc, "hidden_size"), _int(vc, "num_attention_heads")
    # Pixtral's attention splits hidden_size into heads (hidden // heads) whatever head_dim says,
    # while its RoPE uses head_dim: the two only agree when head_dim == hidden / heads.
    if hidden % heads or vc.get("head_dim", hidden // heads) != hidden // heads:
        raise ConfigError(f"vision_config: head_dim={vc.get('head_dim')!r:.80} must equal hidden_size / "
                          f"num_attention_heads = {hidden} / {heads} (as Pixtral's attention computes it)")
    head_dim = hidden // heads
    if head_dim % 4:
        raise ConfigError(f"vision_config: head_dim={head_dim} must be a multiple of 4 (2-D RoPE rotates pairs "
                          "over rows and columns)")
    rope = dict(vc.get("rope_parameters") or {})
    if rope.get("rope_type", "default") not in ("default", "axial"):
        raise ConfigError(f"vision_config rope_type={rope.get('rope_type')!r:.80} is not supported (2-D axial RoPE)")
    theta = rope.get("rope_theta", vc.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise ConfigError(f"vision_config rope_theta={theta!r:.80} must be a finite number > 1")
    _int(vc, "num_channels", 3)
    image_token = _token(hf, "image_token_id", "image_token_index")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=_int(vc, "intermediate_size"),
        num_hidden_layers=_int(vc, "num_hidden_layers"),
        num_attention_heads=heads,
        head_dim=head_dim,
        patch_size=_int(vc, "patch_size"),
        image_size=_int(vc, "image_size", 1540),
        rope_theta=float(theta),
        hidden_act=act,
        spatial_merge_size=_int(hf, "spatial_merge_size", 2),
        text_hidden_size=text_hidden_size,
        projector_eps=float(text_rms_norm_eps),
        image_token_id=image_token,
        image_break_token_id=_token(hf, "image_break_token_id"),
        image_end_token_id=_token(hf, "image_end_token_id"),
    )


def vision_config_to_hf(config: VisionConfig) -> dict[str, Any]:
    """The VLM fields of ``config.json`` (merge into the text model's :func:`nld_jax.config.config_to_hf`)."""
    out: dict[str, Any] = {
        "model_type": "nemotron_labs_diffusion_vlm",
        "architectures": ["NemotronLabsDiffusionVLMModel"],
        "vision_config": {
            "model_type": "pixtral", "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "head_dim": config.head_dim,
            "patch_size": config.patch_size, "image_size": config.image_size, "num_channels": 3,
            "hidden_act": config.hidden_act, "rope_theta": config.rope_theta,
        },
        "spatial_merge_size": config.spatial_merge_size,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
    }
    for name in ("image_token_id", "image_break_token_id", "image_end_token_id"):
        if getattr(config, name) is not None:
            out[name] = getattr(config, name)
    return out


# config.json field -> the tokenizer's token for it (Mistral's / Pixtral's spelling)
_IMAGE_TOKENS = {"image_token_id": "[IMG]", "image_break_token_id": "[IMG_BREAK]", "image_end_token_id": "[IMG_END]"}


def resolve_image_tokens(config: VisionConfig, tokenizer, where: str, vocab: int) -> VisionConfig:
    """``config`` with every image token id config.json leaves out taken from ``tokenizer``
    (``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``); a checkpoint that names an id nowhere is
    refused with an error naming the field (``where``: the config file, for the message)."""
    found = {}
    for field, text in _IMAGE_TOKENS.items():
        value = getattr(config, field)
        if value is None and tokenizer is not None:
            value = tokenizer.token_id(text)
        if value is None:
            extra = " (or image_token_index)" if field == "image_token_id" else ""
            raise ConfigError(f"{where}: a vision-language checkpoint needs {field}{extra} in config.json, or a "
                              f"{text} token in its tokenizer; it has neither, and nld_jax does not guess it")
        if not 0 <= value < vocab:
            raise ConfigError(f"{where}: {field}={value} is outside the text model's vocabulary [0, {vocab})")
        found[field] = value
    return dataclasses.replace(config, **found)
