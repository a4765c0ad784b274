"""Train a tiny vision-language NLD on pictures it draws itself: coloured shapes, with captions and answers.

Everything runs offline on a CPU. Each example is a 56x56 picture (Pillow) of one to three shapes
(circle, square, triangle; red, green, blue, yellow; random size and position, one shape per
quadrant at most, a slightly tinted background) with one of three prompts:

    "describe the image."        -> "a red circle, a blue square and a green triangle."  (reading order)
    "what colour is the square?" -> "blue"    (asked only of a shape the picture holds once)
    "how many shapes?"           -> "three"

The model is a Pixtral tower (patch 14, so a picture is 4x4 patches, 2x2 image tokens after the
Mistral3 projector's 2x2 merge) feeding a small NLD text decoder with a byte-level tokenizer plus
the image tokens ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``. Tower, projector and decoder train
jointly from scratch with NVIDIA's joint AR + block-diffusion objective on the answers (the
image and prompt positions are never masked and never targets: nld_jax.training.vision), and the
result is written in NVIDIA's VLM checkpoint layout with a report: held-out exact-match accuracy
and TPF per decoding mode, greedy, batch 1.

Held-out rule: training example i is drawn by ``numpy.random.default_rng([0, i])`` (an endless
stream; a resumed run continues it), held-out example j by ``default_rng([1, j])``: disjoint seed
streams, so no held-out picture is a training picture (captions of course recur).

    python examples/train_tiny_vlm.py --out /tmp/vlm-1 --steps 2441       # the shipped model, in three sittings:
    python examples/train_tiny_vlm.py --init /tmp/vlm-1 --out /tmp/vlm-2 --steps 1500 --lr 1.5e-3
    python examples/train_tiny_vlm.py --init /tmp/vlm-2 --out /tmp/vlm-3 --steps 1500 --lr 1e-3
    python examples/train_tiny_vlm.py --out /tmp/smoke --size smoke --minutes 0.3 --eval-examples 4
    python examples/train_tiny_vlm.py --evaluate nld_jax/assets/demo-vlm  # re-measure the report

Interrupted runs resume from ``OUT.work/vlm_ckpt`` with the same step count (kept in ``OUT.work/run.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nld_jax  # noqa: E402
from nld_jax.checkpoint.hf_write import save_hf_checkpoint  # noqa: E402
from nld_jax.config import NLDConfig, RopeConfig  # noqa: E402
from nld_jax.params import init_params  # noqa: E402
from nld_jax.training import (LossConfig, OptimConfig, TrainConfig, init_state, make_optimizer,  # noqa: E402
                              make_schedule, make_train_step, make_vlm_inputs, run_training, train_bpe_tokenizer,
                              vlm_batch, vlm_rows)
from nld_jax.vision.config import VisionConfig  # noqa: E402
from nld_jax.vision.params import init_vision_params  # noqa: E402
from train_tiny import calibrated_steps  # noqa: E402

IMAGE = 56  # pixels per side: 4x4 patches of 14, 2x2 image tokens
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
SIZES = {  # text decoder / vision tower
    "demo": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32),
                 vision=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                             head_dim=16)),
    "smoke": dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16),
                  vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              head_dim=8)),
}


# ---- the pictures -------------------------------------------------------------------------

def draw_example(rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """``(picture, prompt, answer)``: one to three shapes, each in its own quadrant."""
    background = tuple(int(v) for v in rng.integers(225, 256, 3))
    image = Image.new("RGB", (IMAGE, IMAGE), background)
    draw = ImageDraw.Draw(image)
    cells = sorted(rng.choice(4, size=int(rng.integers(1, 4)), replace=False).tolist())
    shapes = []
    for cell in cells:  # reading order: quadrants row by row
        shape, colour = SHAPES[int(rng.integers(3))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        rgb = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
        half = IMAGE // 4
        r = int(rng.integers(7, 12))
        cx = (cell % 2) * 2 * half + half + int(rng.integers(-(half - r - 1), half - r))
        cy = (cell // 2) * 2 * half + half + int(rng.integers(-(half - r - 1), half - r))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
        elif shape == "square":
            s = int(r * 0.85)
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=rgb)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r - 2), (cx + r, cy + r - 2)], fill=rgb)
        shapes.append((colour, shape))
    task = rng.random()
    single = [s for s in SHAPES if [k for _, k in shapes].count(s) == 1]
    if task < 0.25:
        return image, "how many shapes?", COUNTS[len(shapes) - 1]
    if task < 0.5 and single:
        shape = single[int(rng.integers(len(single)))]
        return image, f"what colour is the {shape}?", next(c for c, k in shapes if k == shape)
    names = [f"a {c} {k}" for c, k in shapes]
    caption = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return image, "describe the image.", caption + "."


def training_example(index: int):
    return draw_example(np.random.default_rng([0, index]))


def held_out_example(index: int):
    return draw_example(np.random.default_rng([1, index]))


# ---- the model --------------------------------------------------------------------------

def make_tokenizer(directory: str):
    """Bytes (256 + 4 specials, as the default model) plus the three image tokens (260..262)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    from nld_jax.tokenizer import load_tokenizer

    train_bpe_tokenizer(["describe the image."], 260, directory, model_max_length=256)
    path = os.path.join(directory, "tokenizer.json")
    backend = HFTokenizer.from_file(path)
    backend.add_special_tokens([AddedToken(t, special=True) for t in IMAGE_TOKENS])
    backend.save(path)
    return load_tokenizer(directory)


def model_configs(size: str, tok, seq_len: int) -> tuple[NLDConfig, VisionConfig]:
    ids = [tok.token_id(t) for t in IMAGE_TOKENS]
    text = NLDConfig(vocab_size=tok.vocab_size, **SIZES[size]["text"], max_position_embeddings=4 * seq_len,
                     rms_norm_eps=1e-5,
                     rope=RopeConfig(theta=1e4, rope_type="yarn", factor=4.0, original_max_position_embeddings=seq_len,
                                     beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                     llama_4_scaling_beta=0.1),
                     mask_token_id=3, bos_token_id=1, eos_token_id=2, block_size=32)
    vision = VisionConfig(**SIZES[size]["vision"], patch_size=14, image_size=IMAGE, rope_theta=10000.0,
                          hidden_act="silu", spatial_merge_size=2, text_hidden_size=text.D, projector_eps=1e-5,
                          image_token_id=ids[0], image_break_token_id=ids[1], image_end_token_id=ids[2])
    return text, vision


def batch_iterator(tok, vision: VisionConfig, eos: int, batch: int, seq_len: int, start_step: int = 0,
                   first_example: int = 0):
    """Endless batches of freshly drawn training examples; step s draws examples
    first_example + s*B .. first_example + s*B + B - 1."""
    step = start_step
    while True:
        examples = []
        for i in range(first_example + step * batch, first_example + (step + 1) * batch):
            image, prompt, answer = training_example(i)
            examples.append((tok.encode(prompt), tok.encode(answer, add_special_tokens=False), [image]))
        tokens, loss_mask, pixels = vlm_rows(examples, vision, seq_len, tok.bos_id, eos)
        yield vlm_batch(tokens, loss_mask, pixels, vision)
        step += 1


# ---- evaluation -------------------------------------------------------------------------

SETTINGS = {
    "ar": dict(mode="ar"),
    "diffusion_b8_t0.9": dict(mode="diffusion", block_length=8, threshold=0.9),
    "diffusion_b32_t0.9": dict(mode="diffusion", block_length=32, threshold=0.9),
    "spec_b32": dict(mode="spec", block_length=32),
    "spec_quadratic_b8": dict(mode="spec_quadratic", block_length=8),
}


def evaluate(model_dir: str, n_examples: int, new_tokens: int = 64) -> dict:
    """Held-out exact-match accuracy and TPF per decoding mode (greedy, batch 1), and whether
    greedy spec equals greedy AR on every example."""
    model = nld_jax.load(model_dir, dtype="float32")
    examples = [held_out_example(j) for j in range(n_examples)]
    report = {"held_out_examples": n_examples, "held_out_rule": "held-out example j = draw(default_rng([1, j])); "
              "training example i = draw(default_rng([0, i]))", "max_new_tokens": new_tokens}
    outputs = {}
    for name, kw in SETTINGS.items():
        correct = tokens = nfe = 0
        rows = []
        seconds = 0.0
        for image, prompt, answer in examples:
            out = nld_jax.generate(model, [prompt], images=[[image]], max_new_tokens=new_tokens, **kw)
            correct += out.text[0].strip() == answer
            tokens += len(out.tokens[0])
            nfe += out.nfe[0]
            seconds += out.seconds
            rows.append(out.tokens[0])
        outputs[name] = rows
        report[name] = {"accuracy": correct / n_examples, "tpf": tokens / nfe, "tokens": tokens, "nfe": nfe,
                        **kw}
        print(f"  {name:<20} accuracy {correct / n_examples:6.1%}   TPF {tokens / nfe:5.2f}", flush=True)
    for name in ("spec_b32", "spec_quadratic_b8"):  # spec may run past max_new_tokens: compare the common part
        report[f"{name}_equals_ar"] = all(s[:len(a)] == a[:len(s)] for s, a in zip(outputs[name], outputs["ar"]))
    return report


# ---- training ---------------------------------------------------------------------------

def train(args, config: NLDConfig, vision: VisionConfig, tok, work: str):
    """Tower, projector and decoder from scratch, jointly; resumes from ``work/ckpt``."""
    if args.init:  # continue from an earlier sitting's weights (its optimiser state is not kept)
        init = nld_jax.load(args.init, dtype="float32")
        trainable = {"text": init.params, "vision": init.vision}
    else:
        key_text, key_vision = jax.random.split(jax.random.PRNGKey(args.seed))
        trainable = {"text": init_params(config, key_text, jnp.float32, std=0.02),
                     "vision": init_vision_params(vision, key_vision, jnp.float32, std=0.02)}
    block_lengths = tuple(int(b) for b in args.block_lengths.split(","))
    train_cfg = TrainConfig(mode="sft", loss=LossConfig(dlm_weight=0.3), compute_dtype=args.compute_dtype,
                            block_lengths=block_lengths)
    inputs = make_vlm_inputs(vision)
    run_path = os.path.join(work, "run.json")
    if os.path.exists(run_path):  # a resumed run keeps its step count (and so its learning-rate schedule)
        with open(run_path) as f:
            total = json.load(f)["steps"]
    elif args.steps is not None:
        total = args.steps
    else:  # calibrate the step count to the time budget with a throwaway optimiser
        probe_opt = make_optimizer(OptimConfig(lr=args.lr, total_steps=100))
        probe = make_train_step(config, train_cfg, probe_opt, inputs=inputs)
        it = batch_iterator(tok, vision, config.eos_token_id, args.batch, args.seq_len, 0, args.first_example)
        total, _ = calibrated_steps(probe, init_state(jax.tree.map(jnp.copy, trainable), probe_opt), None, it,
                                    block_lengths, args.minutes * 60)
    with open(run_path, "w") as f:
        json.dump({"steps": total}, f)
    opt_cfg = OptimConfig(lr=args.lr, total_steps=total, warmup_steps=min(50 if args.init else 100, total // 10),
                          schedule="wsd")
    optimizer = make_optimizer(opt_cfg)
    step = make_train_step(config, train_cfg, optimizer, inputs=inputs)
    print(f"training: {total} steps of {args.batch} examples of {args.seq_len} tokens", flush=True)
    trainable, seconds = run_training(
        step, trainable, optimizer,
        lambda start: batch_iterator(tok, vision, config.eos_token_id, args.batch, args.seq_len, start_step=start,
                                     first_example=args.first_example),
        total, block_lengths, work, name="vlm", seed=args.seed, schedule=make_schedule(opt_cfg),
        checkpoint_every=max(total // 10, 20), progress=args.progress)
    return trainable, total, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output checkpoint directory")
    p.add_argument("--evaluate", metavar="CKPT", help="only evaluate an existing checkpoint (e.g. the shipped "
                   "nld_jax/assets/demo-vlm) on the held-out examples and print the report")
    p.add_argument("--work", default=None, help="scratch directory (training checkpoints, log); default OUT.work")
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget (calibrated to a step count)")
    p.add_argument("--steps", type=int, default=None, help="training steps instead of calibrating --minutes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--block-lengths", default="8,16,32")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", metavar="CKPT", help="start from this VLM checkpoint's weights (a second sitting: "
                   "the example stream continues after the examples its train_report.json says it has seen)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    args = p.parse_args(argv)
    if args.evaluate:
        report = evaluate(args.evaluate, args.eval_examples)
        print(json.dumps(report, indent=1))
        return report
    if not args.out:
        p.error("--out is required (or --evaluate CKPT)")
    work = args.work or args.out.rstrip("/") + ".work"
    os.makedirs(work, exist_ok=True)
    tok_dir = os.path.join(work, "tokenizer")
    tok = make_tokenizer(tok_dir)
    config, vision = model_configs(args.size, tok, args.seq_len)
    earlier = {}
    if args.init:
        with open(os.path.join(args.init, "train_report.json")) as f:
            earlier = json.load(f)
    args.first_example = earlier.get("examples_seen", 0)
    n_vision = sum(x.size for x in jax.tree.leaves(init_vision_params(vision, jax.random.PRNGKey(0))))
    print(f"model: {config.num_params() / 1e6:.2f}M text + {n_vision / 1e6:.2f}M vision parameters", flush=True)
    trainable, total, seconds = train(args, config, vision, tok, work)

    save_hf_checkpoint(args.out, config, trainable["text"], tokenizer_dir=tok_dir, vision=trainable["vision"],
                       vision_config=vision)
    print("evaluating on held-out examples:", flush=True)
    report = evaluate(args.out, args.eval_examples)
    report.update({"text_parameters": config.num_params(), "vision_parameters": int(n_vision),
                   "steps": total + earlier.get("steps", 0), "examples_seen": args.first_example + total * args.batch,
                   "train_minutes": round(seconds / 60 + earlier.get("train_minutes", 0.0), 1),
                   "sittings": earlier.get("sittings", []) + [{"steps": total, "lr": args.lr, "init": args.init,
                                                               "minutes": round(seconds / 60, 1)}],
                   "config": dataclasses.asdict(config), "vision_config": dataclasses.asdict(vision),
                   "args": vars(args)})
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "vision_config", "args")}, indent=1))
    return report


if __name__ == "__main__":
    main()
