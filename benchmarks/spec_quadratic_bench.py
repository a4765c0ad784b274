"""Quadratic against linear self-speculation and AR, measured side by side in one run, with the
FLOP and byte counts that say where the quadratic forward pays.

For k = 4, 8, 16 (``--blocks``) on (a) the embedded model's held-out prompts (the prompts of
``examples/train_tiny.py --evaluate``: 64 bytes from the held-out stdlib files, the first
``--prompts`` of them) and (b) the golden checkpoint's prompts (``tests/data/nld-tiny``: the 7
prompts of ``golden/cases.json``), it prints TPF, tokens per iteration, tokens/s and ms per
forward of AR, linear spec (``spec``: a draft forward of k tokens, then a verify forward of k
tokens) and quadratic spec (``spec_quadratic``: one forward of k + k*k tokens that verifies the
previous draft and drafts the next block for every acceptance length), without and with the
draft LoRA. Every prompt runs alone (batch 1, the latency setting speculation is for), every
setting on the same prompt one after the other (so that the machine's load falls on all of them
alike), compile time excluded (each program is run once before the timed runs;
``GenerationResult.seconds`` does not include compilation). ``== AR`` checks that greedy output
equals greedy AR on every prompt.

Then, from the model configs (the two measured models and NVIDIA's 8B preset), the FLOPs and bytes
of one linear iteration (two forwards of k tokens) against one quadratic forward (k(k+1) tokens),
and what that means on this CPU (compute-bound: the quadratic forward costs ~(k+1)x a linear
forward) and on an H100 (bandwidth-bound up to ~295 tokens per forward at batch 1).

tokens/s and ms per forward depend on the machine and its load; TPF does not. Compare the ratios
printed in one run (``x AR``, ``q/lin``), not tokens/s between runs.

    python benchmarks/spec_quadratic_bench.py                          # ~2-3 minutes on 2 CPU cores
    python benchmarks/spec_quadratic_bench.py --prompts 24 --new-tokens 128   # the README's held-out setting
    python benchmarks/spec_quadratic_bench.py --models golden --blocks 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import sysconfig
import time

import numpy as np

import nld_jax
from nld_jax.config import NLDConfig, preset
from nld_jax.decode.options import context_needed
from nld_jax.generate import bucket_length, budget_bucket
from nld_jax.loading import STDLIB_CHECKPOINT
from nld_jax.programs import PROGRAMS

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "data" / "nld-tiny"

# NVIDIA H100 SXM: dense bf16 tensor-core peak and HBM3 bandwidth (datasheet).
H100_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12
# Tokens per forward of NLD-8B reported by NVIDIA's tech report (issue 14): quadratic, linear.
REPORT_TPF = {"8B instruct": (6.38, 5.99), "8B base": (7.04, 4.67)}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

def held_out_prompts(model, n: int, prompt_len: int = 64, reserve: int = 128) -> list[list[int]]:
    """The prompts of ``examples/train_tiny.py --evaluate`` (its own picking function: the first
    ``n`` of its 24), BOS + 63 bytes from a held-out stdlib file."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import train_tiny  # the one implementation of the held-out prompts

    with open(os.path.join(STDLIB_CHECKPOINT, "held_out_files.json")) as f:
        names = json.load(f)["files"]
    root = sysconfig.get_paths()["stdlib"]
    prompts, _ = train_tiny.held_out_prompts(model.tokenizer, [os.path.join(root, name) for name in names],
                                             prompt_len, reserve, n)
    if not prompts:
        raise SystemExit(f"none of the held-out files is under {root}")
    return prompts


def golden_prompts() -> list[list[int]]:
    with open(GOLDEN_DIR / "golden" / "cases.json") as f:
        p = json.load(f)["prompts"]
    return p["batch"]["ids"] + p["eos_batch"]["ids"] + [s["ids"] for s in p["spec"]]


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Tally:
    tokens: int = 0
    nfe: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    per_iteration: list = dataclasses.field(default_factory=list)  # tokens decided by each iteration
    outputs: list = dataclasses.field(default_factory=list)

    def add(self, r) -> None:
        self.tokens += len(r.tokens[0])
        self.nfe += r.nfe[0]
        self.seconds += r.seconds
        # decided_at: the forward that fixed each token (prefill = 0 fixes the first one). Every
        # iteration (linear: draft + verify; quadratic: one forward; AR: one forward) fixes its
        # accepted drafts + the bonus token at one forward index, so the counts per index are the
        # tokens each iteration accepted.
        _, counts = np.unique(np.asarray(r.decided_at[0][1:]), return_counts=True)
        self.per_iteration += counts.tolist()
        self.outputs.append(r.tokens[0])

    @property
    def tpf(self) -> float:
        return self.tokens / max(self.nfe, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def ms_per_forward(self) -> float:
        return 1e3 * self.seconds / max(self.nfe, 1)


def settings_for(model, blocks, lora_choices) -> list[tuple[str, int, bool, dict]]:
    out = [("ar", 1, False, dict(mode="ar"))]
    for k in blocks:
        for lora in lora_choices:
            if lora and model.lora is None:
                continue
            for mode in ("spec", "spec_quadratic"):
                out.append((mode, k, lora, dict(mode=mode, block_length=k, use_lora=lora)))
    return out


def measure(model, prompts, new_tokens: int, settings) -> dict:
    """Warm every program (one run per prompt-length bucket, not timed), then run every prompt
    alone through every setting, the settings of one prompt back to back."""
    tallies = {(m, k, lo): Tally() for m, k, lo, _ in settings}
    by_bucket = {}
    for p in prompts:
        by_bucket.setdefault(bucket_length(len(p)), p)
    for (mode, k, lora, kw) in settings:
        # The same program (same budget bucket) with fewer tokens: compiles, costs less to run.
        warm_new = budget_bucket(new_tokens, k) // 2 + 1
        warm_new = warm_new if budget_bucket(warm_new, k) == budget_bucket(new_tokens, k) else new_tokens
        for p in by_bucket.values():
            r = nld_jax.generate(model, [p], max_new_tokens=min(warm_new, new_tokens), **kw)
            tallies[(mode, k, lora)].compile_seconds += r.compile_seconds
    progress(f"compiled {len(settings)} settings x {len(by_bucket)} prompt bucket(s): "
             f"{sum(t.compile_seconds for t in tallies.values()):.1f} s (not timed)")
    for i, p in enumerate(prompts):
        for (mode, k, lora, kw) in settings:
            r = nld_jax.generate(model, [p], max_new_tokens=new_tokens, **kw)
            if r.compile_seconds:  # not warm after all (an evicted program): time it again
                progress(f"{mode} k={k}: compiled again in the timed loop; rerun")
                tallies[(mode, k, lora)].compile_seconds += r.compile_seconds
                r = nld_jax.generate(model, [p], max_new_tokens=new_tokens, **kw)
            tallies[(mode, k, lora)].add(r)
        progress(f"prompt {i + 1}/{len(prompts)} done")
    return tallies


def equals_ar(tally: Tally, ar: Tally) -> bool:
    return all(s[:len(a)] == a[:len(s)] for s, a in zip(tally.outputs, ar.outputs))


def print_table(title: str, tallies: dict, config: NLDConfig, S: int) -> list[tuple[int, bool, float, float]]:
    ar = tallies[("ar", 1, False)]
    print(f"\n{title}")
    print("| mode | k | LoRA | TPF | tokens / iteration | tokens/s | x AR | ms / forward | == AR |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (mode, k, lora), t in tallies.items():
        kk = "" if mode == "ar" else str(k)
        lo = "" if mode == "ar" else ("yes" if lora else "no")
        it = np.mean(t.per_iteration) if t.per_iteration else float("nan")
        same = "" if mode == "ar" else ("yes" if equals_ar(t, ar) else "**no**")
        print(f"| {mode} | {kk} | {lo} | {t.tpf:.2f} | {it:.2f} | {t.tokens_per_second:.0f} | "
              f"{t.tokens_per_second / ar.tokens_per_second:.2f} | {t.ms_per_forward:.2f} | {same} |")
    print("\nquadratic over linear spec, same k and LoRA (one run, same prompts); FLOPs ratio = one quadratic "
          "forward over one linear forward, from the config (the ms ratio it would take if compute-bound):")
    print("| k | LoRA | TPF ratio | ms/forward ratio | FLOPs/forward ratio | tokens/s ratio | tokens/iteration (lin, quad) |")
    print("|---|---|---|---|---|---|---|")
    for (mode, k, lora), q in tallies.items():
        if mode != "spec_quadratic":
            continue
        lin = tallies[("spec", k, lora)]
        speed = q.tokens_per_second / lin.tokens_per_second
        rows.append((k, lora, q.tpf / lin.tpf, speed))
        f_lin = np.mean([forward_cost(config, linear_forward_visible(k, d), S, 4, 4)[0] for d in (True, False)])
        f_q = forward_cost(config, quad_forward_visible(k), S, 4, 4)[0]
        print(f"| {k} | {'yes' if lora else 'no'} | {q.tpf / lin.tpf:.2f} | {q.ms_per_forward / lin.ms_per_forward:.2f} | "
              f"{f_q / f_lin:.1f} | {speed:.2f} | {np.mean(lin.per_iteration):.2f}, {np.mean(q.per_iteration):.2f} |")
    for lora in sorted({lo for _, lo, _, _ in rows}):
        slower = [k for k, lo, _, s in rows if lo == lora and s < 1.0]
        where = f"from k = {min(slower)} on" if slower else "at none of the k measured"
        print(f"  LoRA {'on' if lora else 'off'}: quadratic is slower than linear in tokens/s {where}, "
              f"though its TPF is {min(r for _, lo, r, _ in rows if lo == lora):.2f}-"
              f"{max(r for _, lo, r, _ in rows if lo == lora):.2f}x linear's")
    return rows


# ----------------------------------------------------------------------------------------------
# FLOPs and bytes
# ----------------------------------------------------------------------------------------------

def matmul_weights(c: NLDConfig) -> int:
    """Weights every token multiplies by (the embedding table is gathered, not multiplied; the LM
    head runs on every token: verify and draft both need logits everywhere)."""
    per_layer = c.D * c.H * c.Dh + 2 * c.D * c.K * c.Dh + c.H * c.Dh * c.D + 3 * c.D * c.F
    return c.L * per_layer + c.D * c.V


def forward_cost(c: NLDConfig, visible: np.ndarray, S: int, weight_bytes: float, kv_bytes: float):
    """FLOPs and bytes of one batch-1 forward whose token i attends to ``S + visible[i]`` keys.
    Bytes: every matmul weight once, and the cached K/V of the prefix once (an ideal kernel)."""
    T = len(visible)
    flops = 2 * T * matmul_weights(c) + 4 * c.L * c.H * c.Dh * int(np.sum(S + visible))
    nbytes = matmul_weights(c) * weight_bytes + 2 * c.L * S * c.K * c.Dh * kv_bytes
    return flops, nbytes


def linear_forward_visible(k: int, draft: bool) -> np.ndarray:
    return np.full(k, k) if draft else np.arange(1, k + 1)  # draft: bidirectional; verify: causal


def quad_forward_visible(k: int) -> np.ndarray:
    verify = np.arange(1, k + 1)  # seed + drafts, causal
    groups = np.repeat(np.arange(1, k + 1) + k, k)  # group j sees s, d1..dj and its k masks
    return np.concatenate([verify, groups])


def print_costs(models: dict, blocks) -> None:
    print("\nFLOPs and bytes per iteration at batch 1, from the configs: linear = a draft forward of k tokens + a "
          "verify forward of k tokens; quadratic = one forward of k + k*k tokens. Bytes = the matmul weights once "
          "per forward + the cached K/V of S tokens once per forward (an ideal attention kernel).")
    print("| model | S | k | linear iteration: GFLOP | linear MB read | quadratic forward: GFLOP | quadratic MB read "
          "| FLOPs quad / lin forward | FLOPs quad / lin iteration | bytes quad / lin iteration |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (c, wb, kvb, S) in models.items():
        for k in blocks:
            fd, bd = forward_cost(c, linear_forward_visible(k, True), S, wb, kvb)
            fv, bv = forward_cost(c, linear_forward_visible(k, False), S, wb, kvb)
            fq, bq = forward_cost(c, quad_forward_visible(k), S, wb, kvb)
            print(f"| {name} | {S} | {k} | {(fd + fv) / 1e9:.3g} | {(bd + bv) / 1e6:.4g} | {fq / 1e9:.3g} | "
                  f"{bq / 1e6:.4g} | {fq / fv:.1f} | {fq / (fd + fv):.2f} | {bq / (bd + bv):.2f} |")


def roofline_seconds(flops: float, nbytes: float, peak: float, bandwidth: float) -> float:
    return max(flops / peak, nbytes / bandwidth)


def _gpu_forward_times(c: NLDConfig, k: int, S: int, peak: float) -> tuple[float, float]:
    """Roofline seconds of one linear forward (mean of draft and verify) and one quadratic forward."""
    fv, bv = forward_cost(c, linear_forward_visible(k, False), S, 2, 2)
    fd, bd = forward_cost(c, linear_forward_visible(k, True), S, 2, 2)
    fq, bq = forward_cost(c, quad_forward_visible(k), S, 2, 2)
    t_lin = (roofline_seconds(fv, bv, peak, H100_BYTES_PER_S) + roofline_seconds(fd, bd, peak, H100_BYTES_PER_S)) / 2
    return t_lin, roofline_seconds(fq, bq, peak, H100_BYTES_PER_S)


def print_gpu_estimate(c: NLDConfig, blocks, S: int, measured: dict) -> None:
    ridge = H100_FLOPS / H100_BYTES_PER_S
    ks = sorted(set(blocks) | {32})
    print(f"\nNLD-8B on one H100 (bf16; {H100_FLOPS / 1e12:.0f} TFLOP/s, {H100_BYTES_PER_S / 1e12:.2f} TB/s: ridge "
          f"{ridge:.0f} FLOP/byte; a bf16 weight gives 1 FLOP per byte per token, so a batch-1 forward is "
          f"bandwidth-bound up to ~{ridge:.0f} tokens). {matmul_weights(c) / 1e9:.2f}B matmul weights "
          f"({2 * matmul_weights(c) / 1e9:.1f} GB read per forward), {S} cached tokens; roofline time = "
          "max(FLOPs / peak, bytes / bandwidth). Expected quad / lin tokens/s = (TPF_quad / TPF_lin) x "
          "(t_forward(k tokens) / t_forward(k(k+1) tokens)):")
    print("| k | quad tokens / forward | linear forward ms | quadratic forward ms | quadratic bound | "
          "t_quad / t_lin | t_quad / t_lin at 60 % of peak FLOP/s | expected quad / lin tokens/s, TPF ratio measured "
          "here (embedded) " + "".join(f"| same, TPF as NVIDIA's {n} " for n in REPORT_TPF) + "|")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(REPORT_TPF))
    for k in ks:
        t_lin, t_q = _gpu_forward_times(c, k, S, H100_FLOPS)
        t_lin60, t_q60 = _gpu_forward_times(c, k, S, 0.6 * H100_FLOPS)
        fq, bq = forward_cost(c, quad_forward_visible(k), S, 2, 2)
        bound = "bandwidth" if fq / H100_FLOPS <= bq / H100_BYTES_PER_S else "compute"
        r = measured.get(k)
        exp = f"{r * t_lin / t_q:.2f} (TPF ratio {r:.2f})" if r else "-"
        report = "".join(f"| {q / lin * t_lin / t_q:.2f} " for q, lin in REPORT_TPF.values())
        print(f"| {k} | {k * (k + 1)} | {1e3 * t_lin:.2f} | {1e3 * t_q:.2f} | {bound} | {t_q / t_lin:.2f} | "
              f"{t_q60 / t_lin60:.2f} | {exp} {report}|")
    print("(NVIDIA's TPFs are for its own k, not per k; they only show the TPF ratio to expect on the 8B.) Below "
          "the ridge a forward costs the same whatever its token count, so on the GPU the quadratic forward is free "
          "up to k = 16 and its speedup over linear spec is its TPF ratio; a real kernel reaches less than the peak "
          "FLOP/s, which moves the ridge down (the 60 % column), and k = 32 is compute-bound everywhere.")


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["embedded", "golden"], choices=["embedded", "golden"])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], help="draft lengths k")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts of the embedded model (of 24)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt, embedded model")
    p.add_argument("--golden-new-tokens", type=int, default=48,
                   help="new tokens per prompt, golden checkpoint (its context is 128 positions)")
    p.add_argument("--lora", choices=["both", "on", "off"], default="both")
    p.add_argument("--context", type=int, default=1024, help="cached tokens assumed for NLD-8B in the FLOP/byte counts")
    args = p.parse_args(argv)
    lora_choices = {"both": (False, True), "on": (True,), "off": (False,)}[args.lora]

    # Every setting x prompt bucket is its own program (+ its KV-cache allocator): keep them all
    # compiled, more than generate's default LRU bound holds.
    PROGRAMS.max_entries = max(PROGRAMS.max_entries, 256)
    t0 = time.perf_counter()
    costs, measured_tpf = {}, {}
    for which in args.models:
        if which == "embedded":
            model = nld_jax.load(STDLIB_CHECKPOINT)
            prompts = held_out_prompts(model, args.prompts)
            new = args.new_tokens
            title = (f"(a) embedded model (9.5M, byte tokens, float32): {len(prompts)} held-out prompts of "
                     f"{len(prompts[0])} tokens, {new} new tokens each, greedy, batch 1")
        else:
            model = nld_jax.load(GOLDEN_DIR, dtype="float32")
            prompts = golden_prompts()
            new = args.golden_new_tokens
            title = (f"(b) golden checkpoint (tests/data/nld-tiny, float32): its {len(prompts)} prompts "
                     f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), up to {new} new tokens "
                     f"each (EOS ends 2 of them early), greedy, batch 1")
        limit = model.config.max_position_embeddings
        longest = max(map(len, prompts))
        if context_needed(longest, new, "spec_quadratic", max(args.blocks)) > limit:
            raise SystemExit(f"{which}: {longest} + {new} new tokens at k = {max(args.blocks)} exceed the "
                             f"context of {limit}; lower --new-tokens / --golden-new-tokens")
        settings = settings_for(model, args.blocks, lora_choices)
        progress(f"{which}: {len(prompts)} prompts x {len(settings)} settings, {new} new tokens")
        tallies = measure(model, prompts, new, settings)
        S = int(np.mean([len(q) for q in prompts])) + new // 2  # the runs' mean cached context
        rows = print_table(title, tallies, model.config, S)
        if which == "embedded":
            for k, lora, tpf_ratio, _ in rows:  # the LoRA's ratio where there is one (NVIDIA ships it)
                if lora or k not in measured_tpf:
                    measured_tpf[k] = tpf_ratio
        itemsize = np.dtype(model.dtype).itemsize
        costs[which] = (model.config, itemsize, itemsize, S)
    costs["NLD-8B (bf16)"] = (preset("8b"), 2, 2, args.context)
    print_costs(costs, args.blocks)
    print_gpu_estimate(preset("8b"), args.blocks, args.context, measured_tpf)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s (timings on a shared machine: compare ratios "
          "within this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
