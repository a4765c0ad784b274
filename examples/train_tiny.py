"""Train a small NLD from scratch on the Python standard library's source, then its draft LoRA.

Everything runs offline on the CPU of this machine: a tokenizer is trained on the corpus
(byte-level BPE; ``--vocab 260`` means bytes only: 256 byte tokens + 4 specials, no merges), the
model is trained with NVIDIA's joint AR + block-diffusion objective (nld_jax.training), its draft
LoRA with the self-speculation draft objective, and the result is written in NVIDIA's checkpoint
format (bf16 safetensors, config.json, tokenizer, linear_spec_lora/) together with a report:
held-out AR perplexity, TPF and tokens/s per mode, and greedy spec == greedy AR.

    python examples/train_tiny.py --out /tmp/nld-stdlib                       # the shipped model
    python examples/train_tiny.py --out /tmp/smoke --minutes 1 --lora-minutes 0.5 --size smoke
    python examples/train_tiny.py --evaluate nld_jax/assets/stdlib-model    # re-measure the report
    python examples/train_tiny.py --base CKPT --out CKPT-lora --lora-minutes 14    # only a new draft LoRA

The shipped stdlib model (nld_jax/assets/stdlib-model, the default until the task model replaced it) was made with these defaults (bytes,
46 minutes of base training, 9.5M parameters, then 14 minutes of draft LoRA at lr 3e-3), in three
sittings: the base run was interrupted at step ~880 and resumed from its step-774 training
checkpoint with ``--steps 1937`` (the step count the first start had calibrated; the resumed
steps reproduced the logged losses of the first start exactly), and its first 5-minute LoRA at
lr 1e-3 (spec TPF 1.87, below the 1.88 without it) was replaced by one trained on the finished
base with ``--base CKPT --lora-minutes 14 --lora-lr 3e-3`` (1.95).
Why bytes: with a 512-token BPE the same budget gave diffusion TPF 1.00 and spec TPF 0.88
(tokens carry more information each, and the small model is rarely confident about them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import sysconfig
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import nld_jax
from nld_jax.checkpoint.hf_write import save_hf_checkpoint
from nld_jax.config import NLDConfig, RopeConfig
from nld_jax.params import init_lora, init_params
from nld_jax.training import (LossConfig, OptimConfig, TrainConfig, batches, init_state, make_optimizer,
                              make_schedule, make_train_step, pack_documents, run_training, train_bpe_tokenizer,
                              train_loop)

SIZES = {
    # ~9.5M parameters with the 260-token byte vocabulary: the shipped model
    "small": dict(hidden_size=320, intermediate_size=960, num_hidden_layers=8, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=64),
    "smoke": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32),
}
HELD_OUT_EVERY = 40  # files whose path hash is 0 mod 40 are held out (~2.5%)


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "encodings", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def is_held_out(path: str) -> bool:
    rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
    return zlib.crc32(rel.encode()) % HELD_OUT_EVERY == 0


def read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def model_config(size: str, vocab: int, seq_len: int, block: int) -> NLDConfig:
    return NLDConfig(vocab_size=vocab, **SIZES[size], max_position_embeddings=4 * seq_len, rms_norm_eps=1e-5,
                     rope=RopeConfig(theta=1e4, rope_type="yarn", factor=4.0, original_max_position_embeddings=seq_len,
                                     beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                     llama_4_scaling_beta=0.1),
                     mask_token_id=3, bos_token_id=1, eos_token_id=2, block_size=block)


def calibrated_steps(step_fn, state, frozen, it, block_lengths, budget_s: float) -> tuple[int, object]:
    """Time a few steps and turn the time budget into a step count.

    The step is compiled once per block size; the real run compiles again (its optimiser's
    schedule depends on the step count), so that compilation time is taken off the budget.
    """
    compile_s = 0.0
    for b in block_lengths:  # compile every block length
        t = time.perf_counter()
        state, m = step_fn(state, frozen, {k: jnp.asarray(v) for k, v in next(it).items()}, jnp.int32(b))
        jax.block_until_ready(m)
        compile_s += time.perf_counter() - t
    t = time.perf_counter()
    n = 2 * len(block_lengths)
    for i in range(n):
        state, m = step_fn(state, frozen, {k: jnp.asarray(v) for k, v in next(it).items()},
                           jnp.int32(block_lengths[i % len(block_lengths)]))
    jax.block_until_ready(m)
    per_step = (time.perf_counter() - t) / n
    print(f"calibration: {per_step:.2f} s/step, compilation {compile_s:.0f} s", flush=True)
    return max(int((budget_s - compile_s) / per_step), 10), state


def held_out_prompts(tok, paths: list[str], prompt_len: int, reserve: int, n: int):
    """The evaluation prompts, ``(prompts, their files' ids)``: from each file of ``paths`` in
    order that holds ``prompt_len + reserve + 8`` tokens, BOS + ``prompt_len - 1`` tokens from a
    random start (one generator, seed 0, for all files), until there are ``n``. The report and
    ``benchmarks/spec_quadratic_bench.py`` both use it, so they measure the same prompts."""
    rng = np.random.default_rng(0)
    prompts, whole = [], []
    for path in paths:
        text = read(path)
        if not text:
            continue
        ids = tok.encode(text)
        if len(ids) < prompt_len + reserve + 8:
            continue
        start = int(rng.integers(1, len(ids) - prompt_len - reserve))
        prompts.append([tok.bos_id] + ids[start:start + prompt_len - 1])
        whole.append(ids)
        if len(prompts) == n:
            break
    return prompts, whole


def evaluate(model_dir: str, held_out: list[str], prompt_len: int, new_tokens: int, n_prompts: int) -> dict:
    """Held-out perplexity, TPF and tokens/s per mode, and greedy spec == greedy AR."""
    model = nld_jax.load(model_dir)
    prompts, whole = held_out_prompts(model.tokenizer, held_out, prompt_len, new_tokens, n_prompts)
    ppl_rows = [ids[:min(len(ids), model.config.max_position_embeddings)] for ids in whole]
    # held-out AR perplexity over whole-file prefixes (one forward each)
    nll, count = 0.0, 0
    for ids in ppl_rows:
        logits = np.asarray(nld_jax.forward(model, [ids]))[0, :-1]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    report = {"held_out_files": len(held_out), "eval_prompts": len(prompts), "prompt_len": prompt_len,
              "new_tokens": new_tokens, "ar_perplexity": float(np.exp(nll / count)), "ppl_tokens": count}
    settings = {
        "ar": dict(mode="ar"),
        "diffusion_b8_t0.9": dict(mode="diffusion", block_length=8, threshold=0.9),
        "diffusion_b32_t0.9": dict(mode="diffusion", block_length=32, threshold=0.9),
        "spec_b32": dict(mode="spec", block_length=32),
        "spec_b32_lora": dict(mode="spec", block_length=32, use_lora=True),
        "spec_b8": dict(mode="spec", block_length=8),
    }
    _, speed = measure_modes(model, prompts, settings, new_tokens)
    report.update(speed)
    return report


def measure_modes(model, prompts: list[list[int]], settings: dict[str, dict], new_tokens: int):
    """Greedy generation of every prompt (batch 1, as the speed goals are stated) in every setting.

    Returns ``(outputs, report)``: per setting, each prompt's ``GenerationResult``; and per setting
    its TPF, tokens/s, tokens and forwards over all prompts, plus ``<spec setting>_equals_ar`` for
    every spec setting (equal up to the shorter output: a run that hits ``new_tokens`` may stop at
    another point).
    """
    outputs, report = {}, {}
    for name, kw in settings.items():
        if kw.get("use_lora") and model.lora is None:
            continue
        nld_jax.generate(model, prompts[:1], max_new_tokens=new_tokens, **kw)  # compile
        results = [nld_jax.generate(model, [p], max_new_tokens=new_tokens, **kw) for p in prompts]
        tokens = sum(len(r.tokens[0]) for r in results)
        nfe = sum(r.nfe[0] for r in results)
        seconds = sum(r.seconds for r in results)
        outputs[name] = results
        report[name] = {"tpf": tokens / nfe, "tokens_per_second": tokens / seconds, "tokens": tokens, "nfe": nfe}
        print(f"  {name:<24} TPF {tokens / nfe:5.2f}   {tokens / seconds:7.1f} tokens/s", flush=True)
    for name, kw in settings.items():
        if name in outputs and kw["mode"].startswith("spec") and "ar" in outputs:
            report[f"{name}_equals_ar"] = all(s.tokens[0][:len(a.tokens[0])] == a.tokens[0][:len(s.tokens[0])]
                                              for s, a in zip(outputs[name], outputs["ar"]))
    return outputs, report


def train_base(args, config: NLDConfig, rows, block_lengths: tuple[int, ...], work: str, params=None):
    """NVIDIA's joint AR + diffusion pretraining, from scratch or from ``params`` (float32, warm start);
    resumes from ``work/base_ckpt``. ``rows``: ``[N, L]`` tokens, or a dict of arrays (``tokens`` and
    optionally ``loss_mask``, see nld_jax.training.make_train_step)."""
    data = rows if isinstance(rows, dict) else {"tokens": rows}
    if params is None:
        params = init_params(config, jax.random.PRNGKey(args.seed), jnp.float32, std=0.02)
    # remat: recomputing each layer in the backward pass is faster on CPU than saving its activations
    train = TrainConfig(mode="pretrain", loss=LossConfig(dlm_weight=0.3, remat=True), compute_dtype=args.compute_dtype,
                        block_lengths=block_lengths)

    # Calibrate the step count to the time budget with a throwaway optimiser, then train for real.
    probe_opt = make_optimizer(OptimConfig(lr=args.lr, total_steps=100))
    probe = make_train_step(config, train, probe_opt)
    it = batches(data, args.batch, seed=args.seed)
    if args.steps is None:
        total, _ = calibrated_steps(probe, init_state(jax.tree.map(jnp.copy, params), probe_opt), None, it,
                                    block_lengths, args.minutes * 60)
    else:
        total = args.steps
    warmup = getattr(args, "warmup_steps", None)
    opt_cfg = OptimConfig(lr=args.lr, total_steps=total, schedule="wsd",
                          warmup_steps=min(200, total // 10) if warmup is None else warmup)
    optimizer = make_optimizer(opt_cfg)
    step = make_train_step(config, train, optimizer)
    print(f"base training: {total} steps of {args.batch}x{args.seq_len} tokens", flush=True)
    trainable, seconds = run_training(step, params, optimizer,
                                      lambda start: batches(data, args.batch, seed=args.seed, start_step=start),
                                      total, block_lengths, work, name="base", seed=args.seed,
                                      schedule=make_schedule(opt_cfg), checkpoint_every=max(total // 5, 50),
                                      stop_at_step=getattr(args, "stop_at", None))
    return trainable, total, seconds


def train_lora(args, config: NLDConfig, params, rows, work: str):
    """The self-speculation draft LoRA on the frozen base (draft objective, blocks 8/16/32);
    ``rows`` as in :func:`train_base`."""
    data = rows if isinstance(rows, dict) else {"tokens": rows}
    lora_blocks = (8, 16, 32)
    alpha = 4.0 * args.lora_rank  # scale alpha / r = 4, as NVIDIA's adapter
    lora0 = init_lora(config, jax.random.PRNGKey(args.seed + 1), args.lora_rank, alpha)
    lora_train = TrainConfig(mode="lora", loss=LossConfig(remat=True), compute_dtype=args.compute_dtype,
                             block_lengths=lora_blocks)
    probe_opt = make_optimizer(OptimConfig(lr=args.lora_lr, total_steps=100, weight_decay=0.0))
    probe = make_train_step(config, lora_train, probe_opt, lora_scale=4.0)
    trainable = {"A": lora0["A"], "B": lora0["B"]}
    lit = batches(data, args.batch, seed=args.seed + 7)
    steps, _ = calibrated_steps(probe, init_state(jax.tree.map(jnp.copy, trainable), probe_opt), params,
                                lit, lora_blocks, args.lora_minutes * 60)
    opt_cfg = OptimConfig(lr=args.lora_lr, total_steps=steps, warmup_steps=min(50, steps // 10),
                          schedule="cosine", weight_decay=0.0)
    optimizer = make_optimizer(opt_cfg)
    step = make_train_step(config, lora_train, optimizer, lora_scale=4.0)
    print(f"draft-LoRA training: {steps} steps", flush=True)
    t0 = time.perf_counter()
    state = train_loop(step, init_state(trainable, optimizer, seed=args.seed + 1), params, lit, steps,
                       lora_blocks, log_path=os.path.join(work, "lora_log.jsonl"),
                       schedule=make_schedule(opt_cfg), seed=args.seed + 1)
    seconds = time.perf_counter() - t0
    return {**state.trainable, "scale": jnp.float32(4.0)}, steps, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output checkpoint directory")
    p.add_argument("--evaluate", metavar="CKPT", help="only evaluate an existing checkpoint (e.g. the shipped "
                   "nld_jax/assets/stdlib-model) on the held-out files and print the report")
    p.add_argument("--work", default=None, help="scratch directory (training checkpoints, logs)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--vocab", type=int, default=260, help="tokenizer size; 260 = bytes only")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--minutes", type=float, default=46.0, help="time budget of the base training")
    p.add_argument("--lora-minutes", type=float, default=14.0, help="time budget of the draft-LoRA training")
    p.add_argument("--steps", type=int, default=None,
                   help="base training steps instead of calibrating --minutes (give the printed count when "
                        "resuming an interrupted run, so its learning-rate schedule is unchanged)")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--base", metavar="CKPT", help="skip base training: train only the draft LoRA on this "
                   "checkpoint (its tokenizer, config and weights) and write base + new LoRA to --out")
    p.add_argument("--block-lengths", "--block-sizes", dest="block_lengths", default="8,16,32")
    p.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.evaluate:
        held_out = [f for f in stdlib_files() if is_held_out(f)]
        report = evaluate(args.evaluate, held_out, prompt_len=64, new_tokens=128, n_prompts=args.eval_prompts)
        print(json.dumps(report, indent=1))
        return
    if not args.out:
        p.error("--out is required (or --evaluate CKPT)")
    if args.base and os.path.abspath(args.base) == os.path.abspath(args.out):
        p.error("--out must differ from --base (the base checkpoint is read while --out is written)")
    work = args.work or args.out + ".work"
    os.makedirs(work, exist_ok=True)
    block_lengths = tuple(int(b) for b in args.block_lengths.split(","))

    files = stdlib_files()
    train_files = [f for f in files if not is_held_out(f)]
    held_out = [f for f in files if is_held_out(f)]
    print(f"corpus: {len(train_files)} training files, {len(held_out)} held out", flush=True)
    texts = [t for t in map(read, train_files) if t]
    base_report = {}
    if args.base:  # draft-LoRA only, on an existing base model (its tokenizer, config and weights)
        base = nld_jax.load(args.base, dtype="float32")
        config, params, tok, tok_dir = base.config, base.params, base.tokenizer, args.base
        report_path = os.path.join(args.base, "train_report.json")
        if os.path.exists(report_path):
            with open(report_path) as f:
                base_report = json.load(f)
    else:
        tok_dir = os.path.join(work, "tokenizer")
        tok = train_bpe_tokenizer(texts, args.vocab, tok_dir, model_max_length=4 * args.seq_len)
    encoded = [e.ids for e in tok._backend.encode_batch(texts, add_special_tokens=False)]
    rows = pack_documents(encoded, args.seq_len, tok.bos_id, tok.eos_id)
    print(f"tokens: {rows.size / 1e6:.1f}M in {rows.shape[0]} rows of {args.seq_len}", flush=True)

    if args.base:
        total, base_seconds = base_report.get("base_steps"), 60.0 * base_report.get("base_minutes", 0.0)
    else:
        config = model_config(args.size, tok.vocab_size, args.seq_len, block=max(block_lengths))
        print(f"model: {config.num_params() / 1e6:.1f}M parameters", flush=True)
        params, total, base_seconds = train_base(args, config, rows, block_lengths, work)

    lora, lora_steps, lora_seconds = None, 0, 0.0
    if args.lora_minutes > 0:
        lora, lora_steps, lora_seconds = train_lora(args, config, params, rows, work)

    save_hf_checkpoint(args.out, config, params, lora=lora, tokenizer_dir=tok_dir)
    with open(os.path.join(args.out, "held_out_files.json"), "w") as f:
        root = sysconfig.get_paths()["stdlib"]
        json.dump({"python": sys.version.split()[0], "rule": f"crc32(relative path) % {HELD_OUT_EVERY} == 0",
                   "files": [os.path.relpath(h, root) for h in held_out]}, f, indent=1)
    print("evaluating on held-out prompts:", flush=True)
    report = evaluate(args.out, held_out, prompt_len=64, new_tokens=128, n_prompts=args.eval_prompts)
    report.update({"parameters": config.num_params(), "train_tokens": int(rows.size),
                   "tokens_seen": base_report.get("tokens_seen") if args.base else int(total * args.batch * args.seq_len),
                   "base_steps": total, "base_minutes": round(base_seconds / 60, 1), "lora_steps": lora_steps,
                   "lora_minutes": round(lora_seconds / 60, 1), "base_checkpoint": args.base,
                   "config": dataclasses.asdict(config), "args": vars(args)})
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "args")}, indent=1))


if __name__ == "__main__":
    main()
