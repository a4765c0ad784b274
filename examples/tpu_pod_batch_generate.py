"""Batch generation from a JSONL file over every device of every process (TPU pod, GPU host, CPU).

Input: one JSON object per line, with the prompt as ``text`` (needs the checkpoint's tokenizer)
or ``ids`` (token ids), and optionally its own settings: ``mode`` (ar | diffusion | spec),
``max_new_tokens``, ``block_length``, ``threshold``, ``temperature``, ``use_lora``, ``seed``,
plus ``id`` / ``meta``, copied to the result. Settings a line omits come from the command line.

Output (written by process 0 only): one JSON object per prompt with ``index`` (input line),
``id``, ``mode``, ``tokens``, ``text``, ``nfe`` and ``tpf``, in processing order (prompts are
grouped by settings and sorted by length to reduce padding; the order is deterministic).

Every process reads the same input and runs the same batches: each batch is one global array
split over the mesh (batch over data, heads over tensor), so the prompts are spread over all
processes and devices, and the results come back to every process.

    # one host (CPU, GPU or a single TPU VM); 8 fake CPU devices with --cpu-devices 8
    python examples/tpu_pod_batch_generate.py --checkpoint /ckpt/NLD-8B --input p.jsonl --output r.jsonl
    # tensor parallelism inside each group of 4 devices
    python examples/tpu_pod_batch_generate.py ... --mesh data=-1,tensor=4
    # two processes on one machine (run both, ids 0 and 1)
    python examples/tpu_pod_batch_generate.py ... --cpu-devices 4 --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 0
    # TPU pod slice: the same command on every host; jax finds the coordinator itself
    gcloud compute tpus tpu-vm ssh POD --worker=all --command "python tpu_pod_batch_generate.py ... --distributed on"

For batches whose composition does not depend on the device count (bitwise-reproducible
outputs across meshes), pass ``--batch-size`` explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SETTINGS = ("mode", "max_new_tokens", "block_length", "threshold", "temperature", "use_lora", "seed")
FIELDS = {"id", "meta", "text", "ids", *SETTINGS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="prompts, JSONL")
    p.add_argument("--output", required=True, help="results, JSONL (written by process 0)")
    p.add_argument("--checkpoint", default=None, help="HF or Orbax checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--mesh", default="data=-1", help="mesh sizes over all devices, e.g. data=-1,tensor=4")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global rows per batch (default: 4 per batch shard); padded to a multiple of the shards")
    p.add_argument("--mode", choices=("ar", "diffusion", "spec"), default="ar")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
    p.add_argument("--threshold", type=float, default=None, help="default: 0.9 in diffusion, 0 in spec")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--lora", action="store_true", help="use the draft LoRA (diffusion / spec drafts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementation", "--kernels", dest="implementation", default="auto",
                   help="attention / greedy-head implementation: auto, xla or a Pallas kernel name")
    dist = p.add_argument_group("multi-process")
    dist.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                      help="auto: initialize when --coordinator is given or a multi-host launcher is detected "
                           "(TPU_WORKER_HOSTNAMES, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS); on: always")
    dist.add_argument("--coordinator", default=None, help="host:port of process 0 (e.g. 127.0.0.1:12355)")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    dist.add_argument("--cpu-devices", type=int, default=None,
                      help="fake CPU devices for this process (sets XLA_FLAGS before JAX starts)")
    return p


def _cluster_detected() -> bool:
    """A launcher that jax.distributed.initialize() can read without arguments (multi-host only)."""
    env = os.environ
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(env.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def start_jax(args):
    """Fake CPU devices and jax.distributed must both happen before JAX touches a device."""
    if args.cpu_devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
    import jax

    init = args.distributed == "on" or (args.distributed == "auto" and (args.coordinator or _cluster_detected()))
    if init:
        if args.coordinator:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        else:
            jax.distributed.initialize()
    return jax, bool(init)


def read_prompts(path: str, args) -> list[dict]:
    defaults = {"mode": args.mode, "max_new_tokens": args.max_new_tokens, "block_length": args.block_length,
                "threshold": args.threshold, "temperature": args.temperature, "use_lora": args.lora,
                "seed": args.seed}
    prompts = []
    with open(path) as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            unknown = sorted(set(row) - FIELDS)
            if unknown:
                raise SystemExit(f"{path}:{index + 1}: unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
            if ("text" in row) == ("ids" in row):
                raise SystemExit(f"{path}:{index + 1}: give exactly one of 'text' or 'ids'")
            settings = {k: row.get(k, defaults[k]) for k in SETTINGS}
            if settings["threshold"] is None and settings["mode"] == "diffusion":
                settings["threshold"] = 0.9  # NVIDIA's chat default
            prompts.append({"index": index, "id": row.get("id", index), "meta": row.get("meta"),
                            "prompt": row.get("text", row.get("ids")), "settings": settings})
    return prompts


def plan_batches(prompts: list[dict], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch: grouped by settings (one compiled program each), sorted by length."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p["settings"][k] for k in SETTINGS), []).append(i)
    batches = []
    for members in groups.values():
        members.sort(key=lambda i: (lengths[i], i))
        batches += [members[s:s + batch_size] for s in range(0, len(members), batch_size)]
    return batches


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    jax, distributed = start_jax(args)
    import nld_jax
    from nld_jax.partitioning import batch_shards
    from nld_jax.sharding import mesh_from_spec
    from nld_jax.validation import prompt_ids

    leader = jax.process_index() == 0
    mesh = mesh_from_spec(args.mesh)
    model = nld_jax.load(args.checkpoint, dtype=args.dtype, mesh=mesh)
    prompts = read_prompts(args.input, args)
    ids = prompt_ids([p["prompt"] for p in prompts], vocab=model.config.vocab_size,
                     tokenizer=model.tokenizer) if prompts else []
    batch_size = args.batch_size or 4 * batch_shards(mesh)
    batches = plan_batches(prompts, [len(i) for i in ids], batch_size)

    def log(msg: str) -> None:
        if leader:
            print(msg, file=sys.stderr, flush=True)

    log(f"[nld] {len(prompts)} prompts, {len(batches)} batches of <= {batch_size}; {jax.process_count()} "
        f"process(es), {jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")
    start, done, generated = time.perf_counter(), 0, 0
    out = open(args.output, "w") if leader else None
    try:
        for b, members in enumerate(batches):
            s = prompts[members[0]]["settings"]
            result = nld_jax.generate(model, [ids[i] for i in members], mode=s["mode"],
                                      max_new_tokens=int(s["max_new_tokens"]), block_length=s["block_length"],
                                      threshold=s["threshold"], temperature=float(s["temperature"]),
                                      use_lora=bool(s["use_lora"]), seed=int(s["seed"]), mesh=mesh,
                                      implementation=args.implementation)
            for row, i in enumerate(members):
                p = prompts[i]
                record = {"index": p["index"], "id": p["id"], "mode": s["mode"], "tokens": result.tokens[row],
                          "text": result.text[row] if result.text is not None else None,
                          "nfe": result.nfe[row], "tpf": round(result.tpf[row], 6)}
                if p["meta"] is not None:
                    record["meta"] = p["meta"]
                if out is not None:
                    out.write(json.dumps(record) + "\n")
            if out is not None:
                out.flush()
            done += len(members)
            generated += sum(len(t) for t in result.tokens)
            elapsed = time.perf_counter() - start
            log(f"[nld] batch {b + 1}/{len(batches)} ({s['mode']}) | {done}/{len(prompts)} prompts | "
                f"{generated} tokens | {generated / max(elapsed, 1e-9):.1f} tok/s | {elapsed:.1f} s"
                + (f" (compiled in {result.compile_seconds:.1f} s)" if result.compile_seconds else ""))
    finally:
        if out is not None:
            out.close()
    if distributed:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
