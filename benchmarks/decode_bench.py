"""Decode speed per mode against the weight-bandwidth floor, measured side by side in one run.

For a random NLD config (default ~110M parameters; ``--size 60m`` for the ~60M one the speed
goals name), prints per mode and batch size: tokens/s, TPF, the mean time of one forward, and
that time divided by the floor = weight bytes / measured read bandwidth (a forward must read
every weight once). A forward over a block of C tokens also does ~2 * C * (matmul weights) FLOPs;
the ``x compute`` column divides the forward time by the larger of the two floors (that FLOP
count at the matmul throughput measured here on the LM head's shape, or the bandwidth floor);
the compute floor is the one that binds on a CPU at C=32. Random weights make diffusion unmask
~1 token per step and speculation accept ~1 token per iteration, so TPF is ~1 (diffusion) and
~0.5 (spec); the per-forward column is the one that shows kernel efficiency.

tokens/s and ms per forward depend on the machine's load; the floors are measured in the same
run, so the ratios are what to compare between runs (they move under load too, less). Progress
goes to stderr as it runs (a line per mode); the table goes to stdout.

``--quantize int8`` adds the same random model with int8 weights (float32 compute, or
``--quant-dtype``) beside float32 and bfloat16, side by side in one run: each variant's floor is
its own weight bytes (int8 + float32 scales), and ``x f32`` is its tokens/s over float32's in the
same mode and batch. The bytes one forward reads are every weight but the embedding table (a
forward gathers a few of its rows).

    python benchmarks/decode_bench.py                 # ~110M, batch 1 and 8
    python benchmarks/decode_bench.py --size 60m --batch 1
    python benchmarks/decode_bench.py --size 60m --quantize int8   # float32, bfloat16, int8
    python benchmarks/decode_bench.py --size 60m --batch 1 --blocks 1 8 32 --new-tokens 64
        # per mode and block length: generate's ms per forward beside the forward + greedy head
        # timed alone (benchmarks/forward_profile.py splits that forward into its phases)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import nld_jax
from nld_jax.config import NLDConfig, RopeConfig
from nld_jax.params import flatten_tree, param_bytes

SIZES = {
    "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    "110m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64),
}


def bench_config(size: str) -> NLDConfig:
    return NLDConfig(**SIZES[size], max_position_embeddings=4096, mask_token_id=3, bos_token_id=1,
                     eos_token_id=None, block_size=32,
                     rope=RopeConfig(theta=1e6, factor=16.0, original_max_position_embeddings=16384))


def read_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a jitted full read (a sum) of an array as large as the weights."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / min(times)


def matmul_flops_per_second(config: NLDConfig, rows: int, dtype, repeats: int = 10) -> float:
    """FLOP/s of a jitted ``[rows, hidden] @ [hidden, vocab]`` matmul (the LM head's shape)."""
    x = jnp.ones((rows, config.hidden_size), dtype)
    w = jnp.ones((config.hidden_size, config.vocab_size), dtype)
    f = jax.jit(jnp.dot)
    f(x, w).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, w).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * rows * config.hidden_size * config.vocab_size / min(times)


def forwards_of(mode: str, out) -> int:
    # NFE conventions differ by mode (diffusion excludes its prefill); count every forward run.
    return max(n + (1 if mode == "diffusion" else 0) for n in out.nfe)


def progress(message: str) -> None:
    """On stderr, flushed: the table on stdout stays clean, and a run of minutes shows it is alive."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(model, mode, batch, prompt_len, new_tokens, repeats, threshold, block_length=None):
    rng = np.random.default_rng(0)
    prompts = rng.integers(5, model.config.vocab_size, size=(batch, prompt_len)).tolist()
    kw = dict(mode=mode, max_new_tokens=new_tokens, block_length=block_length or model.config.block_size,
              threshold=threshold if mode == "diffusion" else None)
    start = time.perf_counter()
    first = nld_jax.generate(model, prompts, **kw)  # compile
    progress(f"{mode} batch {batch}: compiled in {first.compile_seconds:.1f} s, warm-up run {first.seconds:.1f} s; "
             f"{repeats} timed runs...")
    results = [nld_jax.generate(model, prompts, **kw) for _ in range(repeats)]
    progress(f"{mode} batch {batch}: done in {time.perf_counter() - start:.1f} s")
    best = min(results, key=lambda r: r.seconds)
    tokens = sum(len(t) for t in best.tokens)
    forwards = forwards_of(mode, best)
    return dict(tok_s=tokens / best.seconds, tpf=statistics.mean(best.tpf), forward_ms=1e3 * best.seconds / forwards,
                seconds=best.seconds, forwards=forwards, tokens=tokens)


def read_bytes(params) -> int:
    """Bytes one forward reads: every weight but the embedding table (only a few rows are gathered)."""
    flat = flatten_tree(params)
    return param_bytes({k: v for k, v in flat.items() if k != "embed_tokens"})


def variants(args) -> list[tuple[str, str, str | None]]:
    """``(label, compute dtype, quantization)`` of each model measured, side by side."""
    dtypes = args.dtype or (["float32", "bfloat16"] if args.quantize else ["float32"])
    out = [(dt, dt, None) for dt in dtypes]
    if args.quantize:
        out.append((args.quantize if args.quant_dtype == "float32" else f"{args.quantize}/{args.quant_dtype}",
                    args.quant_dtype, args.quantize))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="110m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=None,
                   help="unquantized variants (default: float32; float32 and bfloat16 with --quantize)")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="add the same model with quantized weights")
    p.add_argument("--quant-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the quantized variant (default float32: XLA:CPU's bf16 dots are slow)")
    p.add_argument("--modes", nargs="+", choices=["ar", "diffusion", "spec"], default=["ar", "diffusion", "spec"])
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="instead of the table above: per mode and block length C (1: AR; >1: the block modes), "
                        "generate's time per forward beside the forward + greedy head timed alone, and the floor")
    args = p.parse_args(argv)
    if args.blocks:
        return block_forwards(args)

    config = bench_config(args.size)
    modes = tuple(args.modes)
    runs = variants(args)
    progress(f"decode_bench: {args.size} ({config.num_params() / 1e6:.1f}M params; {', '.join(r[0] for r in runs)}), "
             f"modes {', '.join(modes)} at batch {', '.join(map(str, args.batch))}: "
             f"{len(runs) * len(modes) * len(args.batch)} runs of 1 compile + 1 warm-up + {args.repeats} timed "
             f"generations (prompt {args.prompt_len}, {args.new_tokens} new tokens); each takes seconds to minutes")
    base = nld_jax.random_model(config, seed=0, dtype="float32")
    models = {}
    for label, dt, scheme in runs:
        model = nld_jax.random_model(config, seed=0, dtype=dt) if dt != "float32" else base
        models[label] = nld_jax.quantize(model, scheme) if scheme else model
    progress("measuring the read bandwidth (the weight-bandwidth floor)...")
    bw = read_bandwidth(read_bytes(base.params))
    floors = {label: 1e3 * read_bytes(m.params) / bw for label, m in models.items()}
    print(f"backend={jax.default_backend()} devices={jax.device_count()} params={config.num_params() / 1e6:.1f}M "
          f"read bandwidth={bw / 1e9:.1f} GB/s; bytes read per forward (all weights but the embedding) and floor:",
          flush=True)
    for label, m in models.items():
        print(f"  {label:<14} {read_bytes(m.params) / 2**20:7.1f} MiB -> floor {floors[label]:.2f} ms per forward",
              flush=True)
    print("tokens/s and fwd ms depend on this machine's load (shared: compare only within one run); x floor, "
          "x compute and x f32 divide by references measured in this run", flush=True)
    # Weights used by matmuls (the embedding is a gather); the head is one of them.
    matmul_params = config.num_params() - config.vocab_size * config.hidden_size
    print(f"{'weights':<14}{'mode':<10}{'batch':>6}{'tok/s':>10}{'TPF':>7}{'fwd ms':>9}{'x floor':>9}"
          f"{'x compute':>10}{'x f32':>7}{'forwards':>10}", flush=True)
    flops_per_second = {}  # by (rows per forward, dtype): diffusion and spec share theirs
    reference = {}
    for batch in args.batch:
        for mode in modes:
            for label, dt, _ in runs:
                progress(f"{label} {mode} batch {batch}: compiling...")
                r = run(models[label], mode, batch, args.prompt_len, args.new_tokens, args.repeats, args.threshold)
                rows = batch * (1 if mode == "ar" else config.block_size)  # tokens through one decode forward
                if (rows, dt) not in flops_per_second:
                    flops_per_second[rows, dt] = matmul_flops_per_second(config, rows, jnp.dtype(dt))
                compute_ms = 1e3 * 2.0 * rows * matmul_params / flops_per_second[rows, dt]
                reference.setdefault((mode, batch), r["tok_s"] if label == runs[0][0] else None)
                ref = reference[mode, batch]
                print(f"{label:<14}{mode:<10}{batch:>6}{r['tok_s']:>10.1f}{r['tpf']:>7.2f}{r['forward_ms']:>9.2f}"
                      f"{r['forward_ms'] / floors[label]:>9.2f}"
                      f"{r['forward_ms'] / max(floors[label], compute_ms):>10.2f}"
                      f"{(r['tok_s'] / ref if ref else float('nan')):>7.2f}{r['forwards']:>10}", flush=True)


def timed_forward(model, batch: int, width: int, cache_size: int, valid: int, causal: bool, confidence: bool,
                  repeats: int = 10) -> float:
    """Best ms of one jitted forward (``forward_hidden``) + greedy head over ``width`` tokens, with
    a ``cache_size``-slot cache holding ``valid`` entries: a decode step's forward, alone."""
    from nld_jax.attention import BlockPattern
    from nld_jax.kv_cache import KVCache
    from nld_jax.model import forward_hidden, greedy_head

    config, params = model.config, model.params
    pattern = BlockPattern.causal(batch, width) if causal else BlockPattern.bidirectional(batch, width)

    @jax.jit
    def fwd(params, tokens, cache):
        hidden, _, _ = forward_hidden(params, config, tokens, cache, pattern=pattern, uniform=None)
        return greedy_head(params, config, hidden, with_confidence=confidence)

    cache = KVCache.empty(config, batch, cache_size, jnp.float32).with_lengths(jnp.full((batch,), valid))
    tokens = jnp.full((batch, width), 7, jnp.int32)
    jax.block_until_ready(fwd(params, tokens, cache))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fwd(params, tokens, cache))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def block_forwards(args):
    """Per mode and block length: generate's ms per forward (its wall time / forwards run,
    prefill included) beside one forward + greedy head timed alone, against the floor
    max(weight bytes / read bandwidth, matmul FLOPs / matmul rate at B*C rows)."""
    from nld_jax.decode.options import DecodeOptions, cache_size_for
    from nld_jax.generate import bucket_length, budget_bucket

    config = bench_config(args.size)
    model = nld_jax.random_model(config, seed=0, dtype="float32")
    bw = read_bandwidth(read_bytes(model.params))
    bw_floor = 1e3 * read_bytes(model.params) / bw
    matmul_params = config.num_params() - config.vocab_size * config.hidden_size
    print(f"backend={jax.default_backend()} {args.size} ({config.num_params() / 1e6:.1f}M params) float32, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens; read bandwidth {bw / 1e9:.1f} GB/s -> bandwidth floor "
          f"{bw_floor:.2f} ms per forward", flush=True)
    print(f"{'mode':<10}{'C':>4}{'batch':>6}{'tok/s':>9}{'TPF':>6}{'gen fwd ms':>11}{'alone ms':>9}{'floor ms':>9}"
          f"{'(bound)':>10}{'x floor gen':>12}{'x floor alone':>14}{'gen/alone':>10}", flush=True)
    for batch in args.batch:
        for C in args.blocks:
            modes = [m for m in args.modes if (m == "ar") == (C == 1)]
            rows = batch * C
            compute_ms = 1e3 * 2.0 * rows * matmul_params / matmul_flops_per_second(config, rows, jnp.float32)
            floor = max(bw_floor, compute_ms)
            for mode in modes:
                progress(f"{mode} C={C} batch {batch}: generate...")
                r = run(model, mode, batch, args.prompt_len, args.new_tokens, args.repeats, args.threshold,
                        block_length=max(C, 2) if mode != "ar" else None)
                width = 1 if mode == "ar" else C
                options = DecodeOptions(mode=mode, max_new_tokens=budget_bucket(args.new_tokens, max(C, 1)),
                                        block_length=max(C, 2))
                size = cache_size_for(bucket_length(args.prompt_len), options)
                valid = args.prompt_len + args.new_tokens // 2
                alone = timed_forward(model, batch, width, size, valid, causal=mode == "ar",
                                      confidence=mode == "diffusion")
                print(f"{mode:<10}{C:>4}{batch:>6}{r['tok_s']:>9.1f}{r['tpf']:>6.2f}{r['forward_ms']:>11.2f}"
                      f"{alone:>9.2f}{floor:>9.2f}{'compute' if compute_ms > bw_floor else 'bandwidth':>10}"
                      f"{r['forward_ms'] / floor:>12.2f}{alone / floor:>14.2f}{r['forward_ms'] / alone:>10.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
