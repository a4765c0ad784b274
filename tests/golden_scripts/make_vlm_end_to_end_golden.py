"""Make tests/data/vlm-tiny/end_to_end.npz: transformers' whole Mistral3 VLM (Pixtral tower,
Mistral3 projector, ``masked_scatter`` splice, Ministral3 text decoder) on the committed tiny
weights, for nld_jax's end-to-end vision parity test.

NVIDIA's own VLM code is not available here. Its text decoder is: ``tests/data/nld-tiny/golden``
holds what NVIDIA's ``modeling_nemotron_labs_diffusion.py`` computed, and this script first checks
that transformers' ``Ministral3ForCausalLM`` with nld-tiny's config and weights gives those causal
logits (YaRN and the llama-4 query scale at positions past 32 included); only then does it run
``Mistral3ForConditionalGeneration`` (images in, causal logits out), so "transformers' Pixtral /
Mistral3 modules feeding NVIDIA's NLD decoder" is what the arrays hold.

Inputs: nld-tiny's text weights (``tests/data/nld-tiny``) and the tower/projector of
``tests/data/vlm-tiny/vision.safetensors`` (made by ``make_vlm_golden.py``), both committed, so
this script is deterministic. Needs torch and transformers (not dependencies of nld-jax)::

    python tests/golden_scripts/make_vlm_end_to_end_golden.py

Writes ``end_to_end.npz``: per case ``c``, ``ids{c}`` (the expanded prompt: each image as rows of
``[IMG] x w`` + ``[IMG_BREAK]``, the last break ``[IMG_END]``, as transformers' Pixtral processor
lays it out), ``logits{c}`` ``[T, V]`` float32 causal logits, ``greedy{c}`` the next 12 greedy
tokens (full recompute each step); and ``end_to_end.json`` with the cases (which golden images,
the placeholder prompt) and the text check's error.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from transformers import Ministral3Config, Ministral3ForCausalLM, Mistral3Config, Mistral3ForConditionalGeneration
from transformers import PixtralVisionConfig
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "data", "nld-tiny")
VLM = os.path.join(HERE, "..", "data", "vlm-tiny")
GREEDY_STEPS = 12
# Placeholder prompts (10 = [IMG]) and the golden images each one takes, in order.
CASES = [
    # long enough that the image and the greedy tokens sit past position 32 (nld-tiny's YaRN
    # original_max_position_embeddings, where the llama-4 query scale starts to move)
    {"prompt": [1, *range(100, 120), 10, 43, 44, 10, 45, 46, 47], "images": [2, 3]},
    {"prompt": [1, 10, 50, 51, 52, 53], "images": [0]},
    {"prompt": [1, 60, 61, 10, 62, 63, 64, 65, 66], "images": [4]},
]


def text_config() -> Ministral3Config:
    with open(os.path.join(TEXT, "config.json")) as f:
        c = json.load(f)
    config = Ministral3Config(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                              intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                              num_attention_heads=c["num_attention_heads"],
                              num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                              max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                              rope_parameters=dict(c["rope_parameters"]), tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return config


def tensors(path: str) -> dict[str, torch.Tensor]:
    f = safe_open(path, "pt")
    return {k: f.get_tensor(k).float() for k in f.keys()}


def check_text_decoder(text_weights) -> float:
    """transformers' Ministral3 against NVIDIA's golden causal logits on nld-tiny."""
    model = Ministral3ForCausalLM(text_config()).eval()
    state = {k.replace("encoder.", "model.", 1).replace("diffusion_head.", "lm_head.", 1): v
             for k, v in text_weights.items()}
    model.load_state_dict(state, strict=True)
    golden = np.load(os.path.join(TEXT, "golden", "a_causal_logits.npz"))
    with torch.no_grad():
        logits = model(torch.tensor(golden["input_ids"])).logits.numpy()
    return float(np.abs(logits - golden["logits"]).max())


def expand(prompt: list[int], sizes: list[tuple[int, int]], unit: int, ids: dict) -> list[int]:
    out, images = [], iter(sizes)
    for token in prompt:
        if token != ids["image_token_id"]:
            out.append(token)
            continue
        h, w = next(images)
        rows = [[ids["image_token_id"]] * (w // unit) + [ids["image_break_token_id"]] for _ in range(h // unit)]
        rows[-1][-1] = ids["image_end_token_id"]
        out += [t for row in rows for t in row]
    return out


def main() -> int:
    with open(os.path.join(VLM, "vision_config.json")) as f:
        vlm = json.load(f)
    with open(os.path.join(VLM, "cases.json")) as f:
        modes = json.load(f)["modes"]
    v = vlm["vision_config"]
    vision_config = PixtralVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                                        num_hidden_layers=v["num_hidden_layers"],
                                        num_attention_heads=v["num_attention_heads"], head_dim=v["head_dim"],
                                        patch_size=v["patch_size"], image_size=v["image_size"],
                                        hidden_act=v["hidden_act"],
                                        rope_parameters={"rope_type": "axial", "rope_theta": v["rope_theta"]})
    config = Mistral3Config(vision_config=vision_config, text_config=text_config(),
                            spatial_merge_size=vlm["spatial_merge_size"],
                            projector_hidden_act=vlm["projector_hidden_act"],
                            multimodal_projector_bias=vlm["multimodal_projector_bias"],
                            vision_feature_layer=vlm["vision_feature_layer"], image_token_index=vlm["image_token_id"],
                            # Mistral3Config ties the LM head to the embedding by default: NLD has its own head
                            tie_word_embeddings=False)
    config.vision_config._attn_implementation = "eager"
    config._attn_implementation = "eager"

    text_weights = tensors(os.path.join(TEXT, "model.safetensors"))
    text_error = check_text_decoder(text_weights)
    print(f"transformers' Ministral3 vs NVIDIA's golden causal logits: max abs error {text_error:.2e}")
    if text_error > 1e-4:
        print("the text decoders differ: no end-to-end golden", file=sys.stderr)
        return 1

    model = Mistral3ForConditionalGeneration(config).eval()
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    state = {k.replace("encoder.", "model.language_model.", 1).replace("diffusion_head.", "lm_head.", 1): t
             for k, t in text_weights.items()}
    for k, t in tensors(os.path.join(VLM, "vision.safetensors")).items():
        state[k.replace("encoder.", "model.", 1)] = t
    model.load_state_dict(state, strict=True)

    arrays = np.load(os.path.join(VLM, "golden.npz"))
    unit = v["patch_size"] * vlm["spatial_merge_size"]
    processor = PixtralImageProcessorPil(patch_size={"height": unit, "width": unit},
                                         size={"longest_edge": v["image_size"]})
    out: dict[str, np.ndarray] = {}
    for c, case in enumerate(CASES):
        pil = [Image.fromarray(arrays[f"image{i}"], modes[i]) for i in case["images"]]
        processed = processor(pil, return_tensors="pt")
        sizes = [tuple(s) for s in processed["image_sizes"].tolist()]
        ids = expand(case["prompt"], sizes, unit, vlm)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), pixel_values=processed["pixel_values"].float(),
                           image_sizes=processed["image_sizes"]).logits[0]
            greedy, seq = [], list(ids)
            for _ in range(GREEDY_STEPS):
                step = model(input_ids=torch.tensor([seq]), pixel_values=processed["pixel_values"].float(),
                             image_sizes=processed["image_sizes"]).logits[0, -1]
                greedy.append(int(step.argmax()))
                seq.append(greedy[-1])
        out[f"ids{c}"] = np.asarray(ids, np.int64)
        out[f"logits{c}"] = logits.numpy().astype(np.float32)
        out[f"greedy{c}"] = np.asarray(greedy, np.int64)
        print(f"case {c}: {len(ids)} prompt tokens, greedy {greedy}")
    np.savez_compressed(os.path.join(VLM, "end_to_end.npz"), **out)
    with open(os.path.join(VLM, "end_to_end.json"), "w") as f:
        json.dump({"cases": CASES, "text_decoder_vs_nvidia_max_abs_error": text_error,
                   "greedy_steps": GREEDY_STEPS, "torch": torch.__version__,
                   "transformers": transformers.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
