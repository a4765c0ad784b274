"""Block attention and greedy-head kernels at the 8B shapes, against XLA, cuDNN and the HBM floor.

    python benchmarks/attention_bench.py            # full table (GPU or TPU)
    python benchmarks/attention_bench.py --quick    # 8k prefix only
    python benchmarks/attention_bench.py --e2e      # also per-forward AR / verify / diffusion steps

Attention: H=32, K=8, Dh=128, bf16; cached prefix 1k / 8k / 32k; batch 1 and 8; four patterns:
``diffusion`` (bidirectional within the block, cache read-only), ``verify`` (causal) and
``mixed`` (rows alternately causal and bidirectional, as in one batched decode step of rows in
different phases), each for block C in {8, 32}; and ``quadratic`` (quadratic self-speculation's
block of C + C*C queries for C in {8, 16}: causal seed and drafts, then C groups of C masks,
group j seeing keys 0..j and itself), where the TPU and Triton kernels visit only the block-key
tiles holding a visible key. The Mosaic GPU kernel takes uniform batches only and shows n/a for
``mixed`` and ``quadratic``. Baselines get the prefix and the block as one contiguous K/V (concatenated
outside the timed region, which favours them) and an explicit boolean mask, as a cache with
per-row lengths needs. The floor is the bytes that must cross HBM (K/V of prefix + block, q
and the output) over the datasheet bandwidth.

Timing: each jitted program chains ``calls`` kernel calls (the output feeds the next query, so
nothing is hoisted or overlapped) over rotating input sets that together exceed the L2 cache;
the median over repetitions, divided by ``calls``, is reported. CPU: exits with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

H, K, DH = 32, 8, 128
DTYPE = jnp.bfloat16
L2_BYTES = 50 * 2 ** 20  # H100; TPUs have no comparable cache, rotating costs nothing there

# Datasheet HBM bandwidth (bytes/s) by device_kind substring (first match wins).
HBM_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
    ("A100", 1.56e12), ("TPU v5 lite", 8.19e11), ("TPU v5e", 8.19e11), ("TPU v5", 2.765e12),
    ("TPU v6", 1.64e12), ("TPU v4", 1.2e12),
)


@dataclasses.dataclass
class Row:
    label: str
    floor_us: float
    times_us: dict  # implementation -> microseconds (or an error string)


def _bandwidth(device, override_gbps: float | None) -> tuple[float, str]:
    if override_gbps:
        return override_gbps * 1e9, "--hbm-gbps"
    for key, value in HBM_BANDWIDTH:
        if key.lower() in device.device_kind.lower():
            return value, f"datasheet ({key})"
    # Unknown device: a device-to-device copy (read + write) is a realistic ceiling.
    x = jnp.ones((256 * 2 ** 20,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    copy(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        x = copy(x)
    x.block_until_ready()
    return 2 * x.nbytes * 10 / (time.perf_counter() - t0), "measured copy"


def _time_chained(fn, first, sets, reps: int) -> float:
    """Microseconds per ``fn(carry, *set)`` call, chained through ``carry``."""

    @jax.jit
    def chained(carry, sets):
        for s in sets:
            carry = fn(carry, *s)
        return carry

    jax.block_until_ready(chained(first, sets))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(chained(first, sets))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(sets) * 1e6


def _try_time(fn, first, sets, reps):
    try:
        return _time_chained(fn, first, sets, reps)
    except Exception as e:  # a baseline that cannot run this shape (cuDNN limits, say)
        return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})"


def _attention_sets(B, prefix, T, n_sets, seed=0):
    """Per set: the cache as the kernels see it (slots = prefix + T, lengths = prefix) and the
    same keys contiguous for the baselines."""
    sets = []
    for i in range(n_sets):
        ks = jax.random.split(jax.random.key(seed + i), 4)
        rnd = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(DTYPE)
        ck, cv = rnd(ks[0], (B, prefix + T, K, DH)), rnd(ks[1], (B, prefix + T, K, DH))
        k, v = rnd(ks[2], (B, T, K, DH)), rnd(ks[3], (B, T, K, DH))
        lengths = jnp.full((B,), prefix, jnp.int32)
        full_k = jnp.concatenate([ck[:, :prefix], k], axis=1)
        full_v = jnp.concatenate([cv[:, :prefix], v], axis=1)
        sets.append(((k, v, ck, cv, lengths), (full_k, full_v)))
    return sets


def _pattern(mode, B, C):
    """``(pattern, uniform)`` of a benchmark mode (``quadratic``: block length C, C + C*C queries)."""
    from pallas_kernels.block_attention import BlockPattern

    if mode == "quadratic":
        return BlockPattern.quadratic(B, C), None
    if mode == "mixed":
        return BlockPattern.per_row(jnp.arange(B) % 2 == 0, C), None
    return (BlockPattern.causal(B, C), "causal") if mode == "causal" else (BlockPattern.bidirectional(B, C), mode)


def _dense_mask(pattern, prefix):
    """``[B, 1, T, prefix + T]``: the whole prefix, then the block as ``pattern`` says."""
    B, T = pattern.shape
    return jnp.concatenate([jnp.ones((B, T, prefix), bool), pattern.visible()], axis=-1)[:, None]


def attention_table(args, bandwidth, impls) -> list[Row]:
    from pallas_kernels.block_attention.api import block_attention

    rows = []
    prefixes = (8192,) if args.quick else args.prefixes
    labels = {"bidirectional": "diffusion(bidir)", "causal": "verify(causal)", "mixed": "mixed rows",
              "quadratic": "quadratic"}
    shapes = [(mode, B, prefix, C) for mode, B, prefix in itertools.product(labels, args.batches, prefixes)
              for C in (args.quad_blocks if mode == "quadratic" else args.blocks)]
    for mode, B, prefix, C in shapes:
        T = C * (C + 1) if mode == "quadratic" else C  # queries (and block keys) per row
        kv_bytes = 2 * B * (prefix + T) * K * DH * 2
        n_sets = int(min(args.max_calls, max(2, -(-4 * L2_BYTES // kv_bytes))))
        data = _attention_sets(B, prefix, T, n_sets)
        q0 = jax.random.normal(jax.random.key(99), (B, T, H, DH), jnp.float32).astype(DTYPE)
        floor_bytes = kv_bytes + 2 * B * T * H * DH * 2
        pattern, uniform = _pattern(mode, B, C)
        times = {}
        for impl in impls:
            fn = lambda q, k, v, ck, cv, lengths, impl=impl: block_attention(
                q, k, v, ck, cv, lengths, pattern, uniform=uniform, implementation=impl)
            times[impl] = _try_time(fn, q0, [d[0] for d in data], args.reps)
        mask = _dense_mask(pattern, prefix)
        baselines = ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",)
        for base in () if args.no_baselines else baselines:
            fn = lambda q, fk, fv, base=base: jax.nn.dot_product_attention(q, fk, fv, mask=mask, implementation=base)
            times[f"dpa_{base}"] = _try_time(fn, q0, [d[1] for d in data], args.reps)
        rows.append(Row(f"{labels[mode]:16s} B={B} S={prefix:5d} C={C:2d}" + (f" T={T}" if T != C else ""),
                        floor_bytes / bandwidth * 1e6, times))
        print(_format_row(rows[-1], list(times)), flush=True)
    return rows


def head_table(args, bandwidth, impls) -> list[Row]:
    from pallas_kernels.greedy_head import greedy_head, greedy_head_xla

    D, V = args.model_dim, args.vocab
    rows = []
    weight = (jax.random.normal(jax.random.key(1), (D, V), jnp.float32) * 0.02).astype(DTYPE)
    for n_rows in (8, 32, 256):
        hidden = jax.random.normal(jax.random.key(2), (n_rows, D), jnp.float32).astype(DTYPE)

        def chain(fn):  # the next hidden state depends on this call's output, numerically a no-op
            def step(h, w):
                tokens, prob = fn(h, w)
                return h + (prob[:, None] * 1e-30 + tokens[:, None] * 0).astype(h.dtype)
            return step

        times = {impl: _try_time(chain(functools.partial(greedy_head, implementation=impl)), hidden, [(weight,)],
                                 args.reps) for impl in impls}
        times["xla_logits"] = _try_time(chain(greedy_head_xla), hidden, [(weight,)], args.reps)
        rows.append(Row(f"greedy head rows={n_rows:3d} D={D} V={V}", D * V * 2 / bandwidth * 1e6, times))
        print(_format_row(rows[-1], list(times)), flush=True)
    return rows


def e2e_table(args, impls) -> list[Row]:
    """Per-forward time of the decode steps on an 8B-shaped model (``--layers`` layers), batch 1,
    8k prefix: AR (T=1, causal), verify (T=32, causal), diffusion (T=32, bidirectional), with the
    greedy head. The issue's target: verify and diffusion within 1.2x of AR."""
    import nld_jax
    from nld_jax.kv_cache import KVCache
    from nld_jax.model import forward_hidden, greedy_head
    from nld_jax.runtime import Runtime
    from pallas_kernels.block_attention import BlockPattern

    config = dataclasses.replace(nld_jax.preset("8b"), num_hidden_layers=args.layers)
    model = nld_jax.random_model(config, dtype="bfloat16")
    prefix, size = 8192, 8192 + 64
    cache = KVCache(jax.random.normal(jax.random.key(3), (config.L, 1, size, config.K, config.Dh), DTYPE),
                    jax.random.normal(jax.random.key(4), (config.L, 1, size, config.K, config.Dh), DTYPE),
                    jnp.full((1,), prefix, jnp.int32))
    rows = []
    for label, T, uniform in (("AR step", 1, "causal"), ("verify step", 32, "causal"),
                              ("diffusion step", 32, "bidirectional")):
        tokens = jnp.arange(T, dtype=jnp.int32)[None] % config.vocab_size
        pattern = BlockPattern.causal(1, T) if uniform == "causal" else BlockPattern.bidirectional(1, T)
        times = {}
        for impl in ("xla",) + tuple(impls):
            def step(tok, params, cache, impl=impl, pattern=pattern, uniform=uniform):
                runtime = Runtime(impl)
                hidden, _, _ = forward_hidden(params, config, tok, cache, pattern=pattern, uniform=uniform,
                                              runtime=runtime)
                out, _ = greedy_head(params, config, hidden, runtime=runtime)
                return out.astype(jnp.int32) % config.vocab_size
            times[impl] = _try_time(step, tokens, [(model.params, cache)], args.reps)
        rows.append(Row(f"{label:15s} T={T:2d} S={prefix} layers={config.L}", float("nan"), times))
        print(_format_row(rows[-1], list(times)), flush=True)
    return rows


def _fmt(value) -> str:
    return f"{value:9.1f}" if isinstance(value, float) else f"{value:>9s}"[:9]


def _format_row(row: Row, columns) -> str:
    cells = [_fmt(row.times_us.get(c, "-")) for c in columns]
    return f"{row.label:42s} floor {row.floor_us:7.1f} | " + " ".join(cells)


def print_table(title, rows: list[Row], ours: list[str], reference: str | None):
    if not rows:
        return
    columns = list(rows[0].times_us)
    print(f"\n== {title} (microseconds per call; %peak = floor / time)")
    print(f"{'shape':42s} {'floor':>13s} | " + " ".join(f"{c[:9]:>9s}" for c in columns)
          + "".join(f" {'%peak ' + o[:9]:>17s}" for o in ours)
          + (f" {'x vs ' + reference:>14s}" if reference else ""))
    for row in rows:
        line = f"{row.label:42s} floor {row.floor_us:7.1f} | " + " ".join(_fmt(row.times_us[c]) for c in columns)
        for o in ours:
            t = row.times_us.get(o)
            has_floor = isinstance(t, float) and row.floor_us == row.floor_us  # NaN: no floor
            line += f" {100 * row.floor_us / t:16.0f}%" if has_floor else f" {'-':>17s}"
        if reference:
            base, best = row.times_us.get(reference), [row.times_us.get(o) for o in ours]
            best = min([b for b in best if isinstance(b, float)], default=None)
            ok = isinstance(base, float) and best is not None
            line += f" {base / best:13.2f}x" if ok else f" {'-':>14s}"
        print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: tuple(int(x) for x in text.split(","))
    parser.add_argument("--quick", action="store_true", help="8k prefix only")
    parser.add_argument("--prefixes", type=ints, default=(1024, 8192, 32768), help="cached prefix lengths")
    parser.add_argument("--batches", type=ints, default=(1, 8), help="batch sizes")
    parser.add_argument("--blocks", type=ints, default=(8, 32), help="query block sizes C")
    parser.add_argument("--quad-blocks", type=ints, default=(8, 16),
                        help="block lengths C of the quadratic rows (C + C*C queries each)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--max-calls", type=int, default=8, help="chained calls (input sets) per program")
    parser.add_argument("--impls", default=None, help="comma-separated kernel implementations (default: the backend's)")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="override the HBM bandwidth (GB/s)")
    parser.add_argument("--no-head", action="store_true", help="skip the greedy-head table")
    parser.add_argument("--no-baselines", action="store_true", help="skip jax.nn.dot_product_attention")
    parser.add_argument("--model-dim", type=int, default=4096, help="greedy head: D")
    parser.add_argument("--vocab", type=int, default=131072, help="greedy head: V")
    parser.add_argument("--e2e", action="store_true", help="also time whole decode-step forwards")
    parser.add_argument("--layers", type=int, default=4, help="layers of the 8B-shaped model for --e2e")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="smoke-test this script on CPU (with --impls pallas_interpret and small --prefixes)")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu") and not args.allow_cpu:
        print(f"attention_bench: this benchmark times GPU/TPU kernels, but JAX's backend here is "
              f"{backend!r} (no accelerator). Run it on a GPU or TPU machine "
              f"(on a lent H100: bash benchmarks/gpu_device_check.sh).", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    bandwidth, source = _bandwidth(device, args.hbm_gbps)
    impls = args.impls.split(",") if args.impls else (
        ["pallas_triton", "pallas_mosaic_gpu"] if backend == "gpu" else ["pallas_tpu"] if backend == "tpu" else
        ["pallas_interpret"])
    print(f"device {device.device_kind} ({backend}), jax {jax.__version__}, HBM {bandwidth / 1e12:.2f} TB/s "
          f"[{source}], kernels {impls}", flush=True)

    rows = attention_table(args, bandwidth, impls)
    reference = None if args.no_baselines else "dpa_cudnn" if backend == "gpu" else "dpa_xla"
    print_table("block attention, 8B shapes (H=32 K=8 Dh=128 bf16)", rows, impls, reference)
    if not args.no_head:
        print_table("fused greedy head vs full logits", head_table(args, bandwidth, impls), impls, "xla_logits")
    if args.e2e:
        print_table("decode-step forwards (batch 1)", e2e_table(args, impls), [], None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
