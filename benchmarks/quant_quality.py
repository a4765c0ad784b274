"""What weight-only quantization costs in quality, measured on held-out text and printed as a table.

For the embedded stdlib model (nld_jax/assets/stdlib-model; bf16 weights, trained here) and a random ~60M NLD (weights
rounded to bf16 first, as NVIDIA ships them), against those bf16 weights:

* top-1 agreement: the fraction of positions where the quantized model's causal argmax equals
  the reference's (teacher forcing over the held-out text, so errors do not compound);
* perplexity of the held-out text under each, and the relative change;
* mean KL(reference || quantized) per position;
* greedy generation from held-out prompts: the share of prompts whose quantized greedy AR output
  equals the reference's (token for token), and whether greedy spec (block 8 and 32, with the
  draft LoRA where the model has one) and quadratic spec equal greedy AR *on the quantized model
  itself* (both modes run the same quantized weights, so this must hold exactly).

Both sides compute in float32 (XLA:CPU's bf16 dots are slow), so the difference is the weights'
rounding alone. The held-out text is the embedded model's held-out stdlib files
(``held_out_files.json``, this Python's standard library); the random model reads its bytes as
token ids (its perplexity is near its vocabulary size: only the change means anything).

    python benchmarks/quant_quality.py                       # both models, int8 and fp8
    python benchmarks/quant_quality.py --models embedded --schemes int8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np

import nld_jax
from nld_jax.loading import STDLIB_CHECKPOINT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_bench import bench_config  # noqa: E402  (the benchmark's ~60M configuration)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def held_out_texts() -> list[bytes]:
    with open(os.path.join(STDLIB_CHECKPOINT, "held_out_files.json")) as f:
        names = json.load(f)["files"]
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in names:
        try:
            with open(os.path.join(root, name), "rb") as f:
                texts.append(f.read())
        except OSError:
            continue
    if not texts:
        raise SystemExit(f"none of the held-out files is under {root}")
    return texts


def rows_of(model, texts, n_files: int, length: int) -> list[list[int]]:
    """Token ids of the first ``length`` tokens of each file (the embedded model's tokenizer, else bytes)."""
    rows = []
    for text in texts[:n_files]:
        ids = model.tokenizer.encode(text.decode("utf-8", "replace")) if model.tokenizer else list(text)
        ids = ids[:length]
        if len(ids) >= 16:
            rows.append(ids)
    return rows


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced(ref, model, rows) -> dict:
    agree = nll_ref = nll_q = kl = 0.0
    count = 0
    for ids in rows:
        a = log_softmax(np.asarray(nld_jax.forward(ref, [ids]), np.float64)[0, :-1])
        b = log_softmax(np.asarray(nld_jax.forward(model, [ids]), np.float64)[0, :-1])
        target = np.asarray(ids[1:])
        agree += float((a.argmax(-1) == b.argmax(-1)).sum())
        nll_ref -= float(a[np.arange(len(target)), target].sum())
        nll_q -= float(b[np.arange(len(target)), target].sum())
        kl += float((np.exp(a) * (a - b)).sum())
        count += len(target)
    ppl_ref, ppl_q = float(np.exp(nll_ref / count)), float(np.exp(nll_q / count))
    return {"positions": count, "top1_agreement": agree / count, "ppl_ref": ppl_ref, "ppl": ppl_q,
            "ppl_delta": ppl_q / ppl_ref - 1.0, "kl": kl / count}


def greedy(ref, model, prompts, new_tokens: int) -> dict:
    same = lambda a, b: [x[:new_tokens] for x in a] == [x[:new_tokens] for x in b]  # noqa: E731
    ar_ref = nld_jax.generate(ref, prompts, mode="ar", max_new_tokens=new_tokens).tokens
    ar = nld_jax.generate(model, prompts, mode="ar", max_new_tokens=new_tokens).tokens
    out = {"prompts": len(prompts), "ar_equal_to_reference": sum(a == b for a, b in zip(ar, ar_ref)) / len(prompts)}
    checks = [("spec_8", dict(mode="spec", block_length=8)), ("spec_32", dict(mode="spec", block_length=32)),
              ("spec_quadratic_4", dict(mode="spec_quadratic", block_length=4))]
    if model.lora is not None:
        checks.append(("spec_32_lora", dict(mode="spec", block_length=32, use_lora=True)))
    for name, kw in checks:
        out[f"{name}_equals_ar"] = same(nld_jax.generate(model, prompts, max_new_tokens=new_tokens, **kw).tokens, ar)
    return out


def prompts_of(rows, n: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    out = []
    for ids in rows:
        if len(ids) > length + 1:
            start = int(rng.integers(0, len(ids) - length))
            out.append(ids[start:start + length])
        if len(out) == n:
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["embedded", "random60m"], default=["embedded", "random60m"])
    p.add_argument("--schemes", nargs="+", choices=["int8", "fp8"], default=["int8", "fp8"])
    p.add_argument("--files", type=int, default=50, help="held-out files read (embedded model; default all 50)")
    p.add_argument("--random-files", type=int, default=8, help="held-out files read by the random model")
    p.add_argument("--length", type=int, default=1024, help="tokens per file (default: the first 1024)")
    p.add_argument("--prompts", type=int, default=12, help="greedy prompts per model")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    args = p.parse_args(argv)

    texts = held_out_texts()
    results = []
    for name in args.models:
        if name == "embedded":
            ref = nld_jax.load(STDLIB_CHECKPOINT)  # bf16 on disk, float32 compute (exact upcast)
            n_files, length = args.files, min(args.length, ref.config.max_position_embeddings)
        else:
            ref = nld_jax.random_model(bench_config("60m"), seed=0)
            ref = dataclasses.replace(ref, params=jax.tree.map(
                lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), ref.params))
            n_files, length = args.random_files, min(args.length, 512)
        rows = rows_of(ref, texts, n_files, length)
        prompts = prompts_of(rows, args.prompts, 64)
        for scheme in args.schemes:
            progress(f"{name}: quantizing to {scheme}, {len(rows)} held-out files of <= {length} tokens, "
                     f"{len(prompts)} greedy prompts...")
            model = nld_jax.quantize(ref, scheme)
            row = {"model": name, "scheme": scheme, **teacher_forced(ref, model, rows),
                   **greedy(ref, model, prompts, args.new_tokens)}
            results.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print("quantized vs bf16 weights, float32 compute, held-out text (teacher forcing) and greedy decoding")
        print(f"{'model':<10}{'scheme':<7}{'positions':>10}{'top-1 agree':>12}{'ppl bf16':>10}{'ppl q':>10}"
              f"{'ppl delta':>10}{'KL':>9}{'AR == bf16 AR':>14}  greedy spec/quadratic == AR (on the quantized model)")
        for r in results:
            exact = ", ".join(f"{k.removesuffix('_equals_ar')}: {'yes' if v else 'NO'}"
                              for k, v in r.items() if k.endswith("_equals_ar"))
            print(f"{r['model']:<10}{r['scheme']:<7}{r['positions']:>10}{r['top1_agreement']:>12.4f}"
                  f"{r['ppl_ref']:>10.3f}{r['ppl']:>10.3f}{r['ppl_delta']:>+10.2%}{r['kl']:>9.2e}"
                  f"{r['ar_equal_to_reference']:>13.0%}  {exact} ({r['prompts']} prompts)")
    return 0 if all(v for r in results for k, v in r.items() if k.endswith("_equals_ar")) else 1


if __name__ == "__main__":
    sys.exit(main())
