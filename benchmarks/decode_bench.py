"""Decode speed per mode against the weight-bandwidth floor, measured side by side in one run.

For a random NLD config (default ~110M parameters; ``--size 60m`` for the ~60M one the speed
goals name), prints per mode and batch size: tokens/s, TPF, the mean time of one forward, and
that time divided by the floor = weight bytes / measured read bandwidth (a forward must read
every weight once). A forward over a block of C tokens also does ~2 * C * (matmul weights) FLOPs;
the ``x compute`` column divides the forward time by the larger of the two floors (that FLOP
count at the matmul throughput measured here on the LM head's shape, or the bandwidth floor);
the compute floor is the one that binds on a CPU at C=32. Random weights make diffusion unmask ~1 token per step and speculation accept
~1 token per iteration, so TPF is ~1 (diffusion) and ~0.5 (spec); the per-forward column is the
one that shows kernel efficiency.

    python benchmarks/decode_bench.py                 # ~110M, batch 1 and 8
    python benchmarks/decode_bench.py --size 60m --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import nld_jax
from nld_jax.config import NLDConfig, RopeConfig
from nld_jax.params import param_bytes

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


def run(model, mode, batch, prompt_len, new_tokens, repeats, threshold):
    rng = np.random.default_rng(0)
    prompts = rng.integers(5, model.config.vocab_size, size=(batch, prompt_len)).tolist()
    kw = dict(mode=mode, max_new_tokens=new_tokens, block_length=model.config.block_size,
              threshold=threshold if mode == "diffusion" else None)
    nld_jax.generate(model, prompts, **kw)  # compile
    results = [nld_jax.generate(model, prompts, **kw) for _ in range(repeats)]
    best = min(results, key=lambda r: r.seconds)
    tokens = sum(len(t) for t in best.tokens)
    forwards = forwards_of(mode, best)
    return dict(tok_s=tokens / best.seconds, tpf=statistics.mean(best.tpf), forward_ms=1e3 * best.seconds / forwards,
                seconds=best.seconds, forwards=forwards, tokens=tokens)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="110m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    config = bench_config(args.size)
    model = nld_jax.random_model(config, seed=0, dtype=args.dtype)
    wbytes = param_bytes(model.params)
    bw = read_bandwidth(wbytes)
    floor_ms = 1e3 * wbytes / bw
    print(f"backend={jax.default_backend()} devices={jax.device_count()} params={config.num_params() / 1e6:.1f}M "
          f"weights={wbytes / 2**20:.0f} MiB ({args.dtype}) read bandwidth={bw / 1e9:.1f} GB/s "
          f"-> floor {floor_ms:.2f} ms per forward")
    # Weights used by matmuls (the embedding is a gather); the head is one of them.
    matmul_params = config.num_params() - config.vocab_size * config.hidden_size
    print(f"{'mode':<10}{'batch':>6}{'tok/s':>10}{'TPF':>7}{'fwd ms':>9}{'x floor':>9}{'x compute':>10}"
          f"{'forwards':>10}")
    flops_per_second = {}  # by rows per forward (diffusion and spec share theirs)
    for batch in args.batch:
        for mode in ("ar", "diffusion", "spec"):
            r = run(model, mode, batch, args.prompt_len, args.new_tokens, args.repeats, args.threshold)
            rows = batch * (1 if mode == "ar" else config.block_size)  # tokens through one decode forward
            if rows not in flops_per_second:
                flops_per_second[rows] = matmul_flops_per_second(config, rows, jnp.dtype(args.dtype))
            compute_ms = 1e3 * 2.0 * rows * matmul_params / flops_per_second[rows]
            print(f"{mode:<10}{batch:>6}{r['tok_s']:>10.1f}{r['tpf']:>7.2f}{r['forward_ms']:>9.2f}"
                  f"{r['forward_ms'] / floor_ms:>9.2f}{r['forward_ms'] / max(floor_ms, compute_ms):>10.2f}"
                  f"{r['forwards']:>10}")


if __name__ == "__main__":
    main()
