"""``--verify``: run the same forward pass on the source and on the converted checkpoint.

Each checkpoint is loaded in the dtype it is stored in (that is what a user of it gets): with
the same dtype on both sides the logits must be identical, bit for bit; after a dtype change
the report shows what the change costs (largest logit difference and mean KL divergence).
The draft LoRA, when both sides have it, is checked the same way on diffusion-mode logits; a
vision-language checkpoint's tower and projector on the features of a fixed image and the
logits of a prompt holding it.

A quantized result is compared with the source quantized on load (``nld_jax.load(source,
quantize=...)``), which must give the same logits bit for bit; what the quantization itself costs
(against the unquantized source) is reported beside it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["VerificationError", "VerifyReport", "verify_conversion"]


class VerificationError(RuntimeError):
    """Converted weights whose logits differ from the source's at the same dtype."""


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    source_dtype: str
    converted_dtype: str
    max_abs_diff: float
    kl: float
    lora_max_abs_diff: float | None = None
    lora_kl: float | None = None
    vision_max_abs_diff: float | None = None  # a VLM: image features (tower + projector) and logits, with an image
    vision_kl: float | None = None
    quantized: str | None = None  # the scheme: then the reference is the source quantized on load
    unquantized_max_abs_diff: float | None = None  # the quantized result against the source as stored
    unquantized_kl: float | None = None

    @property
    def same_dtype(self) -> bool:
        return self.source_dtype == self.converted_dtype or self.quantized is not None

    def summary(self) -> str:
        if self.quantized is not None:
            text = (f"verify: {self.quantized} ({self.converted_dtype} compute) against the source quantized on load: "
                    f"max |logit diff| {self.max_abs_diff:.3g}; against the unquantized {self.source_dtype} source: "
                    f"max |logit diff| {self.unquantized_max_abs_diff:.3g}, KL {self.unquantized_kl:.3g}")
        else:
            text = (f"verify: {self.source_dtype} -> {self.converted_dtype}: max |logit diff| "
                    f"{self.max_abs_diff:.3g}, KL {self.kl:.3g}")
        if self.lora_max_abs_diff is not None:
            text += f"; draft LoRA logits: max |diff| {self.lora_max_abs_diff:.3g}, KL {self.lora_kl:.3g}"
        if self.vision_max_abs_diff is not None:
            text += (f"; with an image: max |feature or logit diff| {self.vision_max_abs_diff:.3g}, KL "
                     f"{self.vision_kl:.3g}")
        return text


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _compare(a, b) -> tuple[float, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise VerificationError("non-finite logits")
    la, lb = _log_softmax(a), _log_softmax(b)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    return float(np.abs(a - b).max()), max(kl, 0.0)


def fixed_prompt(vocab_size: int, length: int = 16, batch: int = 2) -> np.ndarray:
    """The same token ids on every run (a tokenizer-free prompt works for any checkpoint)."""
    return np.random.default_rng(20260501).integers(0, vocab_size, size=(batch, length), dtype=np.int32)


def fixed_image(config) -> np.ndarray:
    """The same small RGB image (uint8, two by three image tokens) on every run."""
    side = config.merged_patch
    return np.random.default_rng(20260502).integers(0, 256, size=(2 * side, 3 * side, 3), dtype=np.uint8)


def _vision_diff(ref, out, tokens: np.ndarray) -> tuple[float, float]:
    """``(max |diff| of the image features and of the logits, KL of the logits)`` of a VLM on
    ``fixed_image``, placed in front of the text of ``tokens``' first row (image token ids left out)."""
    import nld_jax
    from nld_jax.vision.features import vision_tokens
    from nld_jax.vision.preprocess import preprocess_image
    from nld_jax.vision.prompts import multimodal_prompts

    vc = ref.vision_config
    image = fixed_image(vc)
    pixels = preprocess_image(image, vc)
    features = [vision_tokens(m.vision, m.vision_config, [pixels])[0] for m in (ref, out)]
    feature_diff = float(np.abs(features[0] - features[1]).max())
    special = {vc.image_token_id, vc.image_break_token_id, vc.image_end_token_id}
    text = [int(t) for t in tokens[0] if int(t) not in special][:8]
    placed, _ = multimodal_prompts(ref.vision, vc, ref.params, [text], [[image]], None,
                                   ref.config.max_position_embeddings)
    logit_diff, kl = _compare(nld_jax.forward(ref, placed, images=[[image]]),
                              nld_jax.forward(out, placed, images=[[image]]))
    return max(feature_diff, logit_diff), kl


def verify_conversion(source: str, converted: str) -> VerifyReport:
    import nld_jax
    from nld_jax.checkpoint.directory import load_configs
    from nld_jax.loading import stored_dtype

    src_dtype, out_dtype = stored_dtype(source), stored_dtype(converted)
    # A VLM may name its image tokens only in its tokenizer, which the features need.
    vlm = load_configs(converted)[1] is not None
    out = nld_jax.load(converted, dtype=out_dtype, load_tokenizer_files=vlm)
    scheme = None if out.quantization is None else out.quantization.scheme
    ref = nld_jax.load(source, dtype=out_dtype if scheme else src_dtype, load_tokenizer_files=vlm, quantize=scheme)
    if ref.config != out.config:
        raise VerificationError(f"configs differ: {ref.config} vs {out.config}")
    tokens = fixed_prompt(ref.config.vocab_size, min(16, ref.config.max_position_embeddings))
    max_diff, kl = _compare(nld_jax.forward(ref, tokens), nld_jax.forward(out, tokens))
    plain_diff = plain_kl = None
    if scheme is not None:
        plain = nld_jax.load(source, dtype=src_dtype, load_tokenizer_files=False, load_lora=False)
        plain_diff, plain_kl = _compare(nld_jax.forward(plain, tokens), nld_jax.forward(out, tokens))
    lora_diff = lora_kl = None
    if (ref.lora is None) != (out.lora is None):
        raise VerificationError("the draft LoRA is on one side only")
    if ref.lora is not None:
        half = tokens.shape[1] // 2
        lora_diff, lora_kl = _compare(nld_jax.block_logits(ref, tokens[:, :half], tokens[:, half:], use_lora=True),
                                      nld_jax.block_logits(out, tokens[:, :half], tokens[:, half:], use_lora=True))
    if (ref.vision is None) != (out.vision is None):
        raise VerificationError("the vision tower is on one side only")
    vision_diff = vision_kl = None
    if ref.vision is not None:
        vision_diff, vision_kl = _vision_diff(ref, out, tokens)
    report = VerifyReport(src_dtype, out_dtype, max_diff, kl, lora_diff, lora_kl, vision_diff, vision_kl, scheme,
                          plain_diff, plain_kl)
    if report.same_dtype and (max_diff != 0.0 or (lora_diff or 0.0) != 0.0 or (vision_diff or 0.0) != 0.0):
        raise VerificationError(f"logits differ at the same dtype ({report.summary()})")
    return report
