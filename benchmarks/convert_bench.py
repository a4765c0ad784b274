"""Converter benchmark (a script, not a test): real 3B tensor shapes, only a few layers.

    python benchmarks/convert_bench.py [--layers 4] [--workdir bench_out/convert] [--keep]

Builds a random bf16 checkpoint with the 3B geometry (vocab 131072, hidden 3072, FFN 9216,
32/8 heads of 128; the 131072 x 3072 embedding and head are the largest tensors) in shards
with an index, plus an fp32 draft LoRA of rank 128, then measures in one run:

* ``cp -r`` of the source against the converter (``python -m checkpoints_convert``) on the same
  files: throughput ratio, target >= 1/3 of cp;
* the converter's peak RSS (``VmHWM`` of its process image), target <= 2 GiB + largest tensor,
  independent of the number of layers; the same for ``--reverse``;
* load time of the Orbax result with ``nld_jax.load`` (and of the HF source, for reference);
* with ``--finite-check-cost``: convert and reverse once more per round through the API with
  ``check_finite=False``, so the cost of the NaN/Inf check is measured in the same run.

Dirty pages are flushed (``sync``) before each timed step, so no step pays for another's writes,
and cp / a plain write() of the same bytes / convert / reverse alternate ``--repeat`` times
(medians reported): on a VM whose memory is backed lazily the first touch of a page is slow and
other jobs share the cores, which makes any single run noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_LOAD_SNIPPET = """
import sys, time
import jax, nld_jax
t = time.perf_counter()
model = nld_jax.load(sys.argv[1], dtype="bfloat16", load_tokenizer_files=False)
jax.block_until_ready((model.params, model.lora))
print(f"LOAD_SECONDS {time.perf_counter() - t:.3f}")
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(f"PEAK_RSS_KIB {hwm}")
"""


# Runs the CLI and reports VmHWM, the peak RSS of this process image. (``ru_maxrss`` of a child
# is no good here: Linux carries the parent's RSS at fork into the child's maximum.)
_CONVERT_SNIPPET = """
import sys
from checkpoints_convert.cli import main
rc = main(sys.argv[1:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(f"PEAK_RSS_KIB {hwm}")
sys.exit(rc)
"""

# The same conversions through the API without the NaN/Inf check (argv: SRC DST forward|reverse).
_UNCHECKED_SNIPPET = """
import sys
from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf
convert = convert_orbax_to_hf if sys.argv[3] == "reverse" else convert_hf_to_orbax
print(convert(sys.argv[1], sys.argv[2], progress=False, check_finite=False).summary())
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(f"PEAK_RSS_KIB {hwm}")
"""

# The floor for any user-space writer on this host: write() the same number of bytes from one
# reused 8 MiB buffer (no reading, no transposing, no hashing).
_WRITE_FLOOR_SNIPPET = """
import sys
import numpy as np
total, buf = int(sys.argv[2]), np.ones(8 << 20, np.uint8)
with open(sys.argv[1], "wb") as f:
    for start in range(0, total, buf.nbytes):
        f.write(buf[:min(buf.nbytes, total - start)])
"""


@dataclasses.dataclass
class Run:
    wall: float  # seconds, process start to exit
    cpu: float  # user + system seconds of the process
    rss_mib: float = float("nan")  # VmHWM
    work: float = float("nan")  # the converter's own timing (without interpreter start and imports)


def run_child(args: list[str]) -> tuple[Run, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out_path = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"convert_bench_{os.getpid()}.out"
    with open(out_path, "w+") as out_file:
        t = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=out_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU times
        wall = time.perf_counter() - t
        out_file.seek(0)
        out = out_file.read()
    out_path.unlink()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(args)} failed:\n{out[-3000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime), out


def converter(*args: str, snippet: str = _CONVERT_SNIPPET) -> Run:
    cli_only = ["--no-progress"] if snippet == _CONVERT_SNIPPET else []
    run, out = run_child([sys.executable, "-c", snippet, *args, *cli_only])
    run.rss_mib = int(out.split("PEAK_RSS_KIB")[1].split()[0]) / 1024
    run.work = float(out.split(" read in ")[1].split()[0])
    return run


def same_tensors(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Same tensor names, dtypes, shapes and bytes in two HF directories (one tensor in memory at a time)."""
    from nld_jax.checkpoint.hf import HFCheckpoint

    for sub in (".", "linear_spec_lora"):
        single = "model.safetensors" if sub == "." else "adapter_model.safetensors"
        index = "model.safetensors.index.json" if sub == "." else "adapter_model.safetensors.index.json"
        x, y = (HFCheckpoint(d / sub, single_file=single, index_file=index) for d in (a, b))
        if sorted(x.keys()) != sorted(y.keys()):
            return False
        for key in x.keys():
            if x.dtype(key) != y.dtype(key) or x.shape(key) != y.shape(key):
                return False
            if x.get(key).view(np.uint8).tobytes() != y.get(key).view(np.uint8).tobytes():
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shard-mb", type=int, default=1000, help="source shard size (MB)")
    p.add_argument("--workdir", default=str(ROOT / "bench_out" / "convert"))
    p.add_argument("--repeat", type=int, default=3, help="alternating cp / convert / reverse runs")
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    p.add_argument("--finite-check-cost", action="store_true",
                   help="also convert and reverse without the NaN/Inf check (API, check_finite=False)")
    args = p.parse_args(argv)

    from nld_jax.config import PRESETS

    from checkpoints_convert.testing import write_large_random_checkpoint

    config = PRESETS["3b"].replace(num_hidden_layers=args.layers)
    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, copy, orbax_dir, back = work / "hf", work / "cp", work / "orbax", work / "hf-back"

    t = time.perf_counter()
    info = write_large_random_checkpoint(str(src), config, max_shard_bytes=args.shard_mb * 10**6, lora_rank=128)
    gib, largest_mib = info["bytes"] / 2**30, info["largest"] / 2**20
    print(f"source: 3B shapes, {args.layers} layers, {gib:.2f} GiB in {info['files']} shards + LoRA "
          f"(largest tensor {largest_mib:.0f} MiB), written in {time.perf_counter() - t:.1f} s")

    # cp, the write floor, convert and reverse alternate. Each step first deletes its own output
    # of the previous round: on this kind of VM, writing into pages that were just freed is
    # several times faster than into pages never touched, so every step must get the same kind
    # (the first round, on untouched pages, is slow for all). Other jobs share the cores too.
    runs: dict[str, list[Run]] = {"cp": [], "floor": [], "convert": [], "reverse": []}
    if args.finite_check_cost:
        runs.update({"convert-unchecked": [], "reverse-unchecked": []})
    floor_file = work / "write-floor.bin"

    def fresh(path: pathlib.Path) -> str:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        os.sync()
        return str(path)

    for _ in range(args.repeat):
        runs["cp"].append(run_child(["cp", "-r", str(src), fresh(copy)])[0])
        runs["floor"].append(run_child([sys.executable, "-c", _WRITE_FLOOR_SNIPPET, fresh(floor_file),
                                        str(info["bytes"])])[0])
        runs["convert"].append(converter(str(src), fresh(orbax_dir)))
        runs["reverse"].append(converter(str(orbax_dir), fresh(back), "--reverse"))
        if args.finite_check_cost:
            unchecked = work / "unchecked"
            runs["convert-unchecked"].append(converter(str(src), fresh(unchecked), "forward",
                                                       snippet=_UNCHECKED_SNIPPET))
            runs["reverse-unchecked"].append(converter(str(orbax_dir), fresh(unchecked), "reverse",
                                                       snippet=_UNCHECKED_SNIPPET))
    _, out = run_child([sys.executable, "-c", _LOAD_SNIPPET, str(orbax_dir)])
    t_load = float(out.split("LOAD_SECONDS")[1].split()[0])
    rss_load = int(out.split("PEAK_RSS_KIB")[1].split()[0]) / 1024
    _, out = run_child([sys.executable, "-c", _LOAD_SNIPPET, str(src)])
    t_load_hf = float(out.split("LOAD_SECONDS")[1].split()[0])
    exact = "yes" if same_tensors(src, back) else "NO"

    med = {name: Run(*(statistics.median(getattr(r, f) for r in rs) for f in ("wall", "cpu", "rss_mib", "work")))
           for name, rs in runs.items()}
    budget = 2048 + largest_mib
    print(f"medians of {args.repeat} alternating runs (wall seconds of every run in brackets):")
    for name, label in (("cp", "cp -r"), ("floor", "write() floor"), ("convert", "convert"), ("reverse", "reverse")):
        m = med[name]
        walls = ", ".join(f"{r.wall:.2f}" for r in runs[name])
        extra = f"  (without start-up {m.work:.2f} s)" if name in ("convert", "reverse") else ""
        print(f"  {label:14s} {m.wall:6.2f} s  {gib / m.wall:5.2f} GiB/s  cpu {m.cpu:5.2f} s  [{walls}]{extra}")
    for name in ("convert", "reverse") if args.finite_check_cost else ():
        m, u = med[name], med[f"{name}-unchecked"]
        walls = ", ".join(f"{r.wall:.2f}" for r in runs[f"{name}-unchecked"])
        print(f"  {name + ' unchk':14s} {u.wall:6.2f} s  {gib / u.wall:5.2f} GiB/s  cpu {u.cpu:5.2f} s  [{walls}]  "
              f"(without start-up {u.work:.2f} s)")
        print(f"  NaN/Inf check costs {name}: wall x{m.wall / u.wall:.3f}, without start-up x{m.work / u.work:.3f}, "
              f"cpu x{m.cpu / u.cpu:.3f}")
    ratio = med["cp"].wall / med["convert"].wall
    print(f"convert throughput = {ratio:.2f} x cp (target >= 0.33: {'PASS' if ratio >= 1 / 3 else 'FAIL'}); "
          f"best runs: {min(r.wall for r in runs['cp']) / min(r.wall for r in runs['convert']):.2f} x")
    rss_conv, rss_rev = (max(r.rss_mib for r in runs[k]) for k in ("convert", "reverse"))
    print(f"peak RSS: convert {rss_conv:.0f} MiB, reverse {rss_rev:.0f} MiB (target <= 2048 + {largest_mib:.0f} = "
          f"{budget:.0f}: {'PASS' if max(rss_conv, rss_rev) <= budget else 'FAIL'}); round trip bit-exact: {exact}")
    print(f"load Orbax (bf16) {t_load:.2f} s, loader peak RSS {rss_load:.0f} MiB (HF safetensors load: {t_load_hf:.2f} s)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
