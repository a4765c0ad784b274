"""Make tests/data/vlm-tiny: transformers' own Pixtral tower, Mistral3 projector and Pixtral image
processor on small random weights, for nld_jax's vision parity tests.

Needs torch and transformers (not runtime dependencies of nld-jax; the tests read only the arrays
this writes)::

    pip install torch==2.13.0 transformers
    python tests/golden_scripts/make_vlm_golden.py

Writes, under tests/data/vlm-tiny/:

* ``vision.safetensors``: the tower and projector in NVIDIA's layout (``encoder.vision_tower.*``,
  ``encoder.multi_modal_projector.*``, transformers' names below), float32;
* ``vision_config.json``: the VLM fields of a config.json (merged into nld-tiny's by the tests);
* ``golden.npz``: the raw images (uint8; ``image{i}`` with its PIL mode in ``cases.json``), the image
  processor's ``pixel_values{i}`` ``[3, h, w]``, the tower's packed last hidden state ``hidden``
  ``[N, Dv]`` (all images in one call, block-diagonal attention) and the projector output
  ``features`` ``[Nm, D]``;
* ``cases.json``: versions, geometry, image sizes and modes.

Geometry: Dv 64, 2 layers, 4 heads (head_dim 16), Fv 128, patch 4, spatial merge 2, longest edge 32,
text hidden 64 (nld-tiny's) and its rms_norm_eps 1e-5; SiLU MLP (NVIDIA's config). Weights are
drawn with a larger scale than transformers' init (0.02 would make every layer near-identity) and
norm weights around 1, so that every part of the computation moves the output.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import MistralConfig, Mistral3Config, PixtralVisionConfig, PixtralVisionModel
from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "vlm-tiny")
TEXT_HIDDEN, TEXT_EPS = 64, 1e-5
PATCH, MERGE, LONGEST = 4, 2, 32


def images(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """(PIL mode, uint8 array): smaller than the limit (rounded up), larger (resized down, aspect
    kept), square, with alpha (composited on white), grayscale. Smooth gradients plus noise, so
    that bicubic resampling has something to do."""
    def picture(h, w, c):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(yy * 7 + xx * 3 + 40 * k) % 256 for k in range(c)], -1).astype(np.float64)
        return np.clip(base + rng.normal(0, 30, (h, w, c)), 0, 255).astype(np.uint8)

    return [("RGB", picture(20, 27, 3)), ("RGB", picture(50, 37, 3)), ("RGB", picture(16, 16, 3)),
            ("RGBA", picture(13, 40, 4)), ("L", picture(30, 9, 1)[..., 0])]


def main() -> int:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vision_config = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, head_dim=16, patch_size=PATCH, image_size=LONGEST,
                                        hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text_config = MistralConfig(hidden_size=TEXT_HIDDEN, rms_norm_eps=TEXT_EPS, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=192, num_hidden_layers=1, vocab_size=512)
    config = Mistral3Config(vision_config=vision_config, text_config=text_config, spatial_merge_size=MERGE,
                            projector_hidden_act="gelu", multimodal_projector_bias=False, vision_feature_layer=-1,
                            image_token_index=10)
    config.vision_config._attn_implementation = "eager"
    tower = PixtralVisionModel(config.vision_config).eval()
    projector = Mistral3MultiModalProjector(config).eval()
    with torch.no_grad():
        for module in (tower, projector):
            for name, p in module.named_parameters():
                if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))

    processor = PixtralImageProcessorPil(patch_size={"height": PATCH * MERGE, "width": PATCH * MERGE},
                                         size={"longest_edge": LONGEST})
    raw = images(rng)
    pil = [Image.fromarray(a, mode) for mode, a in raw]
    processed = processor(pil, return_tensors="pt")
    pixel_values, image_sizes = processed["pixel_values"].float(), processed["image_sizes"]
    with torch.no_grad():
        hidden = tower(pixel_values, image_sizes=image_sizes).last_hidden_state[0]
        features = projector(hidden, image_sizes)

    arrays: dict[str, np.ndarray] = {"hidden": hidden.numpy(), "features": features.numpy()}
    for i, ((mode, array), size) in enumerate(zip(raw, image_sizes.tolist())):
        arrays[f"image{i}"] = array
        arrays[f"pixel_values{i}"] = pixel_values[i, :, :size[0], :size[1]].numpy()
    os.makedirs(OUT, exist_ok=True)
    np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)

    weights = {"encoder.vision_tower." + k: v.numpy().copy() for k, v in tower.state_dict().items()}
    weights.update({"encoder.multi_modal_projector." + k: v.numpy().copy() for k, v in projector.state_dict().items()})
    save_file(weights, os.path.join(OUT, "vision.safetensors"))
    vlm_fields = {
        "model_type": "nemotron_labs_diffusion_vlm",
        "architectures": ["NemotronLabsDiffusionVLMModel"],
        "vision_config": {"model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "patch_size": PATCH,
                          "image_size": LONGEST, "num_channels": 3, "hidden_act": "silu", "rope_theta": 10000.0},
        "spatial_merge_size": MERGE, "projector_hidden_act": "gelu", "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        # nld-tiny's vocabulary has no [IMG] tokens: any ids do for a random-weight test; these
        # are the Mistral convention's ([IMG] 10, [IMG_BREAK] 12, [IMG_END] 13).
        "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13,
    }
    with open(os.path.join(OUT, "vision_config.json"), "w") as f:
        json.dump(vlm_fields, f, indent=1)
    cases = {"torch": torch.__version__, "transformers": transformers.__version__,
             "python": sys.version.split()[0], "modes": [mode for mode, _ in raw],
             "raw_sizes": [list(a.shape[:2]) for _, a in raw], "image_sizes": image_sizes.tolist(),
             "tokens_per_image": [(h // (PATCH * MERGE)) * (w // (PATCH * MERGE)) for h, w in image_sizes.tolist()],
             "attn_implementation": "eager", "dtype": "float32"}
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(json.dumps(cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
