"""``nld-plan``: will this model, mesh, batch and context fit? Compiled, never allocated.

    nld-plan --model 8b --mesh data=1,tensor=1 --batch 8 --max-len 8192
    nld-plan --model 14b --mesh data=2,tensor=4 --batch 64 --max-len 32768 --device v5p
    nld-plan --model /ckpt/NLD-8B --mesh tensor=2 --batch 16 --max-len 4096 --json

Each mode's generate program is AOT-compiled on abstract, sharded shapes (``ShapeDtypeStruct``
with shardings; ``.lower(...).compile()``), and ``compiled.memory_analysis()`` gives the bytes
one device needs. Weights, LoRA and KV cache are counted from their per-device shard shapes;
temporaries come from the compiler's buffer assignment.

Without enough accelerators the program is compiled for fake CPU devices (one per mesh
position), which is what makes this work on a laptop. Two XLA passes are then switched off:

* loop-invariant code motion: XLA:CPU has no native bf16 matmul and upcasts bf16 operands to
  f32; the pass would hoist f32 copies of every stacked weight out of the decode loop (+34 GB
  for the 8B), which no accelerator does;
* constant folding: masks built only from static positions (iota comparisons) are
  compile-time constants; folding large ones on the host (earlier versions built one of
  ``[B, K, G, T, S]`` elements) took minutes at long contexts and changes no buffer size.

Remaining CPU upcasts (e.g. of the cache in its update) make the CPU temporaries an upper
bound for GPU and TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

# Usable memory per device (decimal GB as sold); a plan fits if it needs <= (1 - headroom) of it.
DEVICES = {"h100": ("NVIDIA H100 80 GB", 80e9), "h200": ("NVIDIA H200 141 GB", 141e9),
           "v5e": ("TPU v5e 16 GB", 16e9), "v5p": ("TPU v5p 95 GB", 95e9), "v6e": ("TPU v6e 32 GB", 32e9)}
MODES = ("ar", "diffusion", "spec")
# For fake-CPU plans only: see the module docstring.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,"
                                                  "while-loop-expensive-invariant-code-motion,constant_folding"}
_CHILD_ENV = "NLD_PLAN_CHILD"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nld-plan", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--model", required=True, help="3b | 8b | 14b, or a checkpoint directory (only config.json is read)")
    p.add_argument("--mesh", default="data=1,tensor=1", help="mesh sizes, e.g. data=2,tensor=4 (axes: data, fsdp, tensor)")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--max-len", type=int, default=8192, help="context per row: prompt + generated tokens (KV slots)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt bucket (default: max-len / 8)")
    p.add_argument("--block-length", type=int, default=None, help="diffusion / spec block (default: the config's)")
    p.add_argument("--lora-rank", type=int, default=128, help="draft LoRA rank used by spec (0: no LoRA)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of ar,diffusion,spec")
    p.add_argument("--device", choices=sorted(DEVICES), action="append", default=None,
                   help="report the fit for this device only (repeatable; default: all)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free (default 0.1)")
    p.add_argument("--backend", choices=("auto", "cpu"), default="auto",
                   help="auto: the local accelerators if there are enough, else fake CPU devices")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _ensure_cpu_devices(needed: int) -> bool:
    """Ask for ``needed`` fake CPU devices before JAX starts; False if it started with fewer."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        current = os.environ.get("XLA_FLAGS", "")
        have = 1
        for f in current.split():
            if f.startswith("--xla_force_host_platform_device_count="):
                have = int(f.split("=", 1)[1])
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={max(needed, have)}"])
    return len(jax.devices("cpu")) >= needed


def _shard_bytes(tree, shardings) -> int:
    import jax

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


@dataclasses.dataclass
class ModeReport:
    mode: str
    weights: int
    lora: int
    kv_cache: int
    inputs: int
    temporaries: int
    outputs: int  # results not aliased to a donated input
    argument_bytes: int  # what the compiler counts for the arguments (cross-check)
    compile_seconds: float

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.kv_cache + self.inputs + self.temporaries + self.outputs


def plan(config, mesh, *, batch: int, prompt_len: int, max_new_tokens: int, block_length: int, lora_rank: int,
         dtype, modes=MODES, compiler_options=None) -> list[ModeReport]:
    from nld_jax.decode import DecodeOptions, cache_size_for
    from nld_jax.sharded import abstract_decode_args, compile_decode

    reports = []
    for mode in modes:
        rank = lora_rank if mode == "spec" and lora_rank else None
        options = DecodeOptions(mode=mode, max_new_tokens=max_new_tokens, block_length=block_length,
                                use_threshold=mode == "diffusion", use_lora=rank is not None, kernels="auto")
        compiled, layout, seconds = compile_decode(config, options, mesh, batch=batch, prompt_len=prompt_len,
                                                   dtype=dtype, lora_rank=rank, compiler_options=compiler_options)
        params, lora, cache, inputs = abstract_decode_args(config, options, layout, batch=batch, prompt_len=prompt_len,
                                                           cache_size=cache_size_for(prompt_len, options),
                                                           dtype=dtype, lora_rank=rank)
        mem = compiled.memory_analysis()
        reports.append(ModeReport(
            mode=mode,
            weights=_shard_bytes(params, layout.params),
            lora=_shard_bytes(lora, layout.lora) if lora is not None else 0,
            kv_cache=_shard_bytes(cache, layout.cache),
            inputs=_shard_bytes(inputs, layout.inputs),
            temporaries=int(mem.temp_size_in_bytes),
            outputs=max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0),
            argument_bytes=int(mem.argument_size_in_bytes),
            compile_seconds=seconds,
        ))
        del compiled
    return reports


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gb(n: int) -> str:
    return f"{n / 1e9:8.2f}"


def _print_table(summary: dict, reports: list[ModeReport], fits: dict, notes: list[str], out) -> None:
    print(summary["title"], file=out)
    print("per-device memory, GB (1e9 bytes):", file=out)
    cols = ("weights", "lora", "kv_cache", "inputs", "temporaries", "outputs", "total")
    print(f"  {'mode':<10}" + "".join(f"{c:>12}" for c in cols) + f"{'compile s':>12}", file=out)
    for r in reports:
        print(f"  {r.mode:<10}" + "".join(f"{_gb(getattr(r, c)):>12}" for c in cols)
              + f"{r.compile_seconds:12.1f}", file=out)
    print(f"  all modes compiled in {sum(r.compile_seconds for r in reports):.1f} s on {summary['compiled_on']}",
          file=out)
    print(f"fit (largest mode, {summary['headroom']:.0%} of device memory kept free):", file=out)
    for name, f in fits.items():
        verdict = "fits" if f["fits"] else "does NOT fit"
        print(f"  {f['device']:<20} {verdict:<13} need {f['need'] / 1e9:7.2f} GB of {f['usable'] / 1e9:7.2f} GB usable",
              file=out)
    for n in notes:
        print(f"note: {n}", file=out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jax._src import xla_bridge

    from nld_jax.sharding import parse_mesh

    if not xla_bridge.backends_are_initialized():
        # A fresh process (the CLI): report real compile times, not persistent-cache hits.
        # In-process callers keep their own cache settings (JAX fixes them at first use).
        import jax

        jax.config.update("jax_enable_compilation_cache", False)

    sizes = parse_mesh(args.mesh)
    if any(s == -1 for s in sizes.values()):
        raise SystemExit("error: give every mesh size explicitly in a plan (no -1)")
    needed = math.prod(sizes.values())
    if not _ensure_cpu_devices(needed):
        # JAX started earlier in this process with too few devices: plan in a fresh one.
        if os.environ.get(_CHILD_ENV):
            raise SystemExit(f"error: could not get {needed} CPU devices")
        env = dict(os.environ, **{_CHILD_ENV: "1"})
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={needed}").strip()
        return subprocess.run([sys.executable, "-m", "nld_jax.cli.plan", *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode

    import jax
    import jax.numpy as jnp

    from nld_jax.config import PRESETS, load_hf_config, preset
    from nld_jax.sharding import fallback_notes, make_mesh

    config = preset(args.model) if args.model.lower().removeprefix("nld-").removesuffix("-base") in PRESETS \
        else load_hf_config(args.model)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    block = args.block_length or config.block_size
    prompt_len = args.prompt_len or max(16, args.max_len // 8)
    max_new = args.max_len - prompt_len - block  # so that every mode's cache fits in max-len slots
    if max_new < 1:
        raise SystemExit(f"error: --max-len {args.max_len} leaves no room after a {prompt_len}-token prompt "
                         f"and a {block}-token block")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"error: unknown mode(s) {bad}; choose from {MODES}")

    accel = [d for d in jax.devices() if d.platform != "cpu"]
    use_accel = args.backend == "auto" and len(accel) >= needed
    devices = accel if use_accel else jax.devices("cpu")
    mesh = make_mesh(**sizes, devices=devices)
    options = None if use_accel else CPU_COMPILER_OPTIONS
    reports = plan(config, mesh, batch=args.batch, prompt_len=prompt_len, max_new_tokens=max_new,
                   block_length=block, lora_rank=args.lora_rank, dtype=dtype, modes=modes, compiler_options=options)

    worst = max(r.total for r in reports)
    fits = {}
    for name in (args.device or list(DEVICES)):
        label, capacity = DEVICES[name]
        usable = capacity * (1 - args.headroom)
        fits[name] = {"device": label, "capacity": capacity, "usable": usable, "need": worst, "fits": worst <= usable}
    notes = fallback_notes(config, mesh, batch=args.batch, lora_rank=args.lora_rank or None)
    if not use_accel:
        notes.append("compiled for XLA:CPU fake devices; temporaries are XLA:CPU's buffer assignment (with CPU "
                     "bf16 upcasts), an upper bound for GPU/TPU compilers")
        notes.append("CPU runs the XLA reference attention, whose prefill materialises float32 scores "
                     "[B, K, G, prompt, cache] per layer; the GPU/TPU kernels do not")
    mesh_txt = " x ".join(f"{a}={n}" for a, n in sizes.items())
    summary = {
        "title": (f"nld-plan: {args.model} ({_count(config.num_params())} params, {args.dtype}) on mesh "
                  f"{mesh_txt} ({needed} device{'s' if needed > 1 else ''}); batch {args.batch}, context "
                  f"{args.max_len} = prompt {prompt_len} + {max_new} new + block {block}"),
        "model": args.model, "mesh": sizes, "batch": args.batch, "max_len": args.max_len, "prompt_len": prompt_len,
        "max_new_tokens": max_new, "block_length": block, "dtype": args.dtype, "headroom": args.headroom,
        "compiled_on": f"{devices[0].platform} ({'real' if use_accel else 'fake'} devices)",
    }
    if args.json:
        print(json.dumps({**summary, "modes": [dict(dataclasses.asdict(r), total=r.total) for r in reports],
                          "fits": fits, "notes": notes,
                          "compile_seconds_total": sum(r.compile_seconds for r in reports)}))
    else:
        _print_table(summary, reports, fits, notes, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
