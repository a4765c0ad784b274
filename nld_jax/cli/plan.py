"""nld-plan: will this model, mesh, batch and context fit? Compiled, never allocated.

    nld-plan --checkpoint 8b --mesh data=1,tensor=1 --batch 8 --max-len 8192
    nld-plan --checkpoint 14b --mesh data=2,tensor=4 --batch 64 --max-len 32768 --device v5p
    nld-plan --checkpoint /ckpt/NLD-8B --mesh tensor=2 --batch 16 --max-len 4096 --json
    nld-plan --checkpoint 8b --quantize int8 --batch 1 --max-len 4096 --device v5e

The generate program of each mode is compiled on abstract, sharded shapes and measured
(nld_jax.planning). Without enough accelerators it is compiled for fake CPU devices (up to
2048), which works on a laptop; the CPU numbers are an upper bound for GPU/TPU compilers.
Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings

MAX_BATCH = 1 << 20
MAX_LEN = 1 << 24
MAX_FAKE_DEVICES = 2048  # XLA:CPU refuses 4096 devices in one process ("multiprocess computations")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other error of this CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(limit: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be in [1, {limit}], got {value}")
        return value
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from nld_jax.planning import DEVICES

    p = _Parser(prog="nld-plan", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--checkpoint", "--model", dest="model", required=True, metavar="PRESET_OR_DIR",
                   help="required: a preset (3b, 8b, 14b) or a checkpoint directory, of which only config.json "
                        "is read (--model is an alias)")
    p.add_argument("--mesh", default="data=1,tensor=1",
                   help="mesh sizes over the axes data, fsdp and tensor, each named once; an axis left out is 1 "
                        "(default: %(default)s)")
    p.add_argument("--batch", type=_positive(MAX_BATCH), default=8, help="global batch, rows (default: %(default)s)")
    p.add_argument("--max-len", type=_positive(MAX_LEN), default=8192,
                   help="context per row: prompt + generated tokens = KV slots (default: %(default)s)")
    p.add_argument("--prompt-len", type=_positive(MAX_LEN), default=None,
                   help="prompt bucket (default: max-len / 8, at least 16)")
    p.add_argument("--block-length", type=_positive(4096), default=None,
                   help="diffusion / spec block (default: the config's block_size)")
    p.add_argument("--lora-rank", type=int, default=128,
                   help="draft LoRA rank used by spec, 0 = none (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights and KV cache (default: %(default)s)")
    p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                   help="weights stored quantized (one float32 scale per output channel), computing in --dtype; "
                        "the draft LoRA stays float32 (default: not quantized)")
    p.add_argument("--kv-cache", choices=("int8",), default=None,
                   help="int8: an int8 KV cache (one float32 scale per cached vector); default: the cache in --dtype")
    p.add_argument("--modes", default="ar,diffusion,spec", help="comma-separated subset (default: %(default)s)")
    p.add_argument("--device", choices=sorted(DEVICES), action="append", default=None,
                   help="report the fit for this device only (repeatable; default: all)")
    p.add_argument("--headroom", type=_fraction, default=0.1,
                   help="fraction of device memory kept free, in [0, 1) (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "cpu"), default="auto",
                   help="auto: the local accelerators if there are enough, else fake CPU devices "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (default: the table)")
    return p


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _print_table(summary: dict, reports, fits: dict, notes: list[str], out) -> None:
    print(summary["title"], file=out)
    print("per-device memory, GB (1e9 bytes):", file=out)
    cols = ("weights", "lora", "kv_cache", "inputs", "temporaries", "outputs", "total")
    print(f"  {'mode':<10}" + "".join(f"{c:>12}" for c in cols) + f"{'compile s':>12}", file=out)
    for r in reports:
        print(f"  {r.mode:<10}" + "".join(f"{getattr(r, c) / 1e9:12.2f}" for c in cols)
              + f"{r.compile_seconds:12.1f}", file=out)
    print(f"  all modes compiled in {sum(r.compile_seconds for r in reports):.1f} s on {summary['compiled_on']}",
          file=out)
    print(f"fit (largest mode, {summary['headroom']:.0%} of device memory kept free):", file=out)
    for f in fits.values():
        verdict = "fits" if f["fits"] else "does NOT fit"
        print(f"  {f['device']:<20} {verdict:<13} need {f['need'] / 1e9:7.2f} GB of {f['usable'] / 1e9:7.2f} GB usable",
              file=out)
    for n in notes:
        print(f"note: {n}", file=out)


def _devices(needed: int, backend: str):
    """Accelerators when there are enough, else ``needed`` CPU devices (fake ones if JAX has not
    started yet in this process)."""
    import jax

    fake = min(needed, MAX_FAKE_DEVICES)  # more would make XLA:CPU fail (refused below)
    if fake > max(int(jax.config.jax_num_cpu_devices), 1):  # never fewer than the process asked for
        try:
            jax.config.update("jax_num_cpu_devices", fake)
        except RuntimeError:
            pass  # JAX already started in this process: use the devices it has
    accel = [d for d in jax.devices() if d.platform != "cpu"]
    if backend == "auto" and len(accel) >= needed:
        return accel, True
    if needed > MAX_FAKE_DEVICES:
        raise ValueError(f"--mesh asks for {needed} devices: without that many accelerators here the plan is "
                         f"compiled for fake CPU devices, of which XLA:CPU takes at most {MAX_FAKE_DEVICES}; run "
                         "nld-plan on the accelerators themselves")
    cpus = jax.devices("cpu")
    if len(cpus) < needed:
        raise ValueError(f"the mesh needs {needed} devices and this process has {len(cpus)} CPU devices; run nld-plan "
                         "in a fresh process (it asks for enough fake CPU devices before JAX starts)")
    return cpus, False


def _mesh(spec: str, parse_mesh) -> dict[str, int]:
    """``--mesh`` as sizes; its errors name the flag (the library's messages name only the spec)."""
    names = [part.partition("=")[0].strip() for part in spec.split(",")]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--mesh {spec!r}: axis {', '.join(twice)} given more than once")
    try:
        sizes = parse_mesh(spec)
    except ValueError as e:
        raise ValueError(f"--mesh {spec!r}: {str(e).removeprefix(f'mesh spec {spec!r}: ')}") from None
    if any(s == -1 for s in sizes.values()):
        raise ValueError(f"--mesh {spec!r}: give every mesh size explicitly in a plan (no -1)")
    return sizes


def run(args, out=None) -> int:
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirect
    from nld_jax.checkpoint.directory import load_hf_config
    from nld_jax.config import PRESETS, preset
    from nld_jax.decode import MODES
    from nld_jax.partitioning import ShardingFallbackWarning, fallback_notes
    from nld_jax.sharding import make_mesh, parse_mesh

    sizes = _mesh(args.mesh, parse_mesh)
    needed = math.prod(sizes.values())
    key = args.model.lower().removeprefix("nld-").removesuffix("-base")
    if key in PRESETS:
        config = preset(key)
    elif os.sep in args.model or args.model.startswith(".") or os.path.exists(args.model):
        config = load_hf_config(args.model)
    else:
        raise ValueError(f"--checkpoint {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                         "directory")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown mode(s) {bad}; choose from {MODES}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    block = args.block_length or config.block_size
    prompt_len = args.prompt_len or max(16, args.max_len // 8)
    max_new = args.max_len - prompt_len - block  # so that every mode's cache fits in max-len slots
    if max_new < 1:
        raise ValueError(f"--max-len {args.max_len} leaves no room after a {prompt_len}-token prompt and a "
                         f"{block}-token block")

    import jax.numpy as jnp

    from nld_jax.planning import CPU_COMPILER_OPTIONS, DEVICES, fits, plan

    devices, real = _devices(needed, args.backend)
    mesh = make_mesh(**sizes, devices=devices)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    with warnings.catch_warnings():  # the fallbacks are listed once below, as notes
        warnings.simplefilter("ignore", ShardingFallbackWarning)
        reports = plan(config, mesh, batch=args.batch, prompt_len=prompt_len, max_new_tokens=max_new,
                       block_length=block, lora_rank=args.lora_rank, dtype=dtype, modes=modes,
                       compiler_options=None if real else CPU_COMPILER_OPTIONS, quantize=args.quantize,
                       kv_cache=args.kv_cache)
    fit = fits(reports, args.device or list(DEVICES), args.headroom)
    notes = fallback_notes(config, mesh, batch=args.batch, lora_rank=args.lora_rank or None)
    if not real:
        notes.append("compiled for XLA:CPU fake devices; temporaries are XLA:CPU's buffer assignment (with CPU "
                     "bf16 upcasts), an upper bound for GPU/TPU compilers")
    mesh_txt = " x ".join(f"{a}={n}" for a, n in sizes.items())
    weights_txt = args.dtype if args.quantize is None else f"{args.quantize} weights, {args.dtype} compute"
    weights_txt += ", int8 KV cache" if args.kv_cache else ""
    summary = {
        "title": (f"nld-plan: {args.model} ({_count(config.num_params())} params, {weights_txt}) on mesh {mesh_txt} "
                  f"({needed} device{'s' if needed > 1 else ''}); batch {args.batch}, context {args.max_len} = "
                  f"prompt {prompt_len} + {max_new} new + block {block}"),
        "model": args.model, "mesh": sizes, "batch": args.batch, "max_len": args.max_len, "prompt_len": prompt_len,
        "max_new_tokens": max_new, "block_length": block, "dtype": args.dtype, "quantize": args.quantize,
        "kv_cache": args.kv_cache,
        "headroom": args.headroom,
        "compiled_on": f"{devices[0].platform} ({'real' if real else 'fake'} devices)",
    }
    if args.json:
        print(json.dumps({**summary, "modes": [dict(dataclasses.asdict(r), total=r.total) for r in reports],
                          "fits": fit, "notes": notes,
                          "compile_seconds_total": sum(r.compile_seconds for r in reports)}), file=out)
    else:
        _print_table(summary, reports, fit, notes, out)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, ShardingError are ValueErrors
        print(f"nld-plan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nld-plan: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the compiler refusing a shape (JaxRuntimeError): one line, not a traceback
        if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
            raise
        print(f"nld-plan: error: the compiler refused this plan: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
