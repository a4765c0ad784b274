"""Serving throughput on loopback: ``nld-serve`` under a bounded load, against ``nld_jax.generate``
called one request at a time in the same run (the baseline of the ratio).

The load is ``--requests`` greedy completions (modes in turn, code prompts, ``--max-tokens``
each), sent by ``--concurrency`` client threads that stream every answer (SSE) so that the time
to the first token (TTFT) and the time per output token after it (ITL: (last - first chunk) /
(tokens - 1), per request) can be read. Each server configuration (``--ar-steps``) is an
``nld-serve`` process of its own, compiled before the load. Every answer's token count is
checked against the baseline's (greedy: they must be equal). The baseline runs again at the
end, which shows how much the machine's load moved during the run. ``--profile`` adds the
engine's step time per program and slot count, and the scheduler's host time per step,
measured in process.

    python benchmarks/serve_bench.py                                    # 64 requests, concurrency 1 4 16
    python benchmarks/serve_bench.py --ar-steps auto narrow --profile
    python benchmarks/serve_bench.py --modes ar --concurrency 16 --requests 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import nld_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n\ndef main():", "class Stack:\n    def __init__(self):",
    "def quicksort(xs):", "for i in range(10):", "def read_json(path):", "import numpy as np\n\ndef softmax(x):",
    "def is_prime(n):",
]
REQUEST_SECONDS = 300


def workload(n: int, modes: list[str], block_length: int | None) -> list[dict]:
    extra = {} if block_length is None else {"block_length": block_length}
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "mode": modes[i % len(modes)], **extra} for i in range(n)]


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"{q[49] * 1e3:.0f}/{q[89] * 1e3:.0f}/{q[98] * 1e3:.0f}"


# ---------------------------------------------------------------------- baseline


def baseline(model, work: list[dict], max_tokens: int) -> dict:
    """generate, one request at a time; each mode compiled once before the clock starts."""
    block = {"block_length": work[0]["block_length"]} if "block_length" in work[0] else {}
    for mode in sorted({w["mode"] for w in work}):
        for prompt in PROMPTS:  # every prompt bucket of every mode
            nld_jax.generate(model, [prompt], mode=mode, max_new_tokens=max_tokens, **block)
    tokens, started = [], time.perf_counter()
    for w in work:
        out = nld_jax.generate(model, [w["prompt"]], mode=w["mode"], max_new_tokens=max_tokens, **block)
        tokens.append(min(len(out.tokens[0]), max_tokens))  # the server cuts spec's overshoot
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "rps": len(work) / seconds, "tps": sum(tokens) / seconds}


# ---------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, ar_steps: str, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "nld_jax.cli.serve", "--port", str(port), "--slots", str(args.slots),
               "--max-new-tokens", str(args.max_tokens), "--max-queue", str(args.requests),
               "--ar-steps", ar_steps, "--model-name", "bench"]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    if args.block_width:
        command += ["--block-width", str(args.block_width)]
    if args.max_len:
        command += ["--max-len", str(args.max_len)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nld-serve exited with {process.returncode}; see {log.name}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("nld-serve was not ready within 600 s")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def one_request(port: int, body: dict) -> dict:
    """A streamed completion: its TTFT, ITL, token count and latency."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first = last = None
    tokens = 0
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    conn.close()
    first = first or done
    return {"ttft": first - started, "itl": ((last or first) - first) / max(tokens - 1, 1), "tokens": tokens,
            "latency": done - started}


def run_load(port: int, work: list[dict], max_tokens: int, concurrency: int) -> dict:
    bodies = [{"model": "bench", "max_tokens": max_tokens, **w} for w in work]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(lambda b: one_request(port, b), bodies, timeout=REQUEST_SECONDS * len(work)))
    seconds = time.perf_counter() - started
    tokens = [r["tokens"] for r in records]
    return {"seconds": seconds, "tokens": tokens, "rps": len(work) / seconds, "tps": sum(tokens) / seconds,
            "ttft": percentiles([r["ttft"] for r in records]), "itl": percentiles([r["itl"] for r in records])}


# ---------------------------------------------------------------------- profile


def profile(model, slot_counts: list[int], args, steps: int = 20) -> None:
    """Device time of one step of each program at each slot count (every program computes all
    its slots, live or not), the snapshot the scheduler reads after it, and the scheduler's
    host work per step (its loop time minus the engine calls)."""
    import jax

    from nld_jax.serving.engine import Engine, EngineConfig, SlotSettings
    from nld_jax.serving.scheduler import Request, Scheduler

    print("\nprofile (in process; ms per step)")
    print(f"{'slots':>5} {'ar_steps':>8} {'program':>40} {'step':>8} {'snapshot':>9}")
    for slots in slot_counts:
        for ar_steps in ("narrow", "wide"):  # auto runs one of these two programs each step
            engine = Engine(model, EngineConfig(slots=slots, max_new_tokens=args.max_tokens, ar_steps=ar_steps,
                                                max_len=args.max_len, block_width=args.block_width))
            engine.warmup()
            for modes, width in engine._groups:
                program = engine._step[modes, False]
                engine.state = jax.block_until_ready(program(model.params, model.lora, engine.state))
                t = time.perf_counter()
                for _ in range(steps):
                    engine.state = program(model.params, model.lora, engine.state)
                jax.block_until_ready(engine.state)
                step = (time.perf_counter() - t) / steps
                t = time.perf_counter()
                for _ in range(steps):
                    engine.snapshot()
                snap = (time.perf_counter() - t) / steps
                print(f"{slots:>5} {ar_steps:>8} {'+'.join(modes) + f' (width {width})':>40} {step * 1e3:8.2f} "
                      f"{snap * 1e3:9.2f}")
    # Host work of the scheduler per step, with all slots busy in AR (the cheapest device step).
    slots = slot_counts[-1]
    engine = Engine(model, EngineConfig(slots=slots, max_new_tokens=args.max_tokens, max_len=args.max_len,
                                        block_width=args.block_width))
    engine.warmup()
    scheduler = Scheduler(engine, max_queue=4 * slots, tokenizer=model.tokenizer)
    timed = {"engine": 0.0, "steps": 0}
    inner_step, inner_snapshot = engine.step, engine.snapshot

    def step(live):
        t = time.perf_counter()
        inner_step(live)
        timed["engine"] += time.perf_counter() - t
        timed["steps"] += 1

    def snapshot():
        t = time.perf_counter()
        out = inner_snapshot()
        timed["engine"] += time.perf_counter() - t
        return out

    engine.step, engine.snapshot = step, snapshot
    settings = SlotSettings(mode="ar", max_new_tokens=args.max_tokens, block_length=1, threshold=None)
    scheduler.start()
    started = time.perf_counter()
    jobs = [scheduler.submit(Request(model.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), settings))
            for i in range(slots)]
    for job in jobs:
        job.result(REQUEST_SECONDS)
    wall = time.perf_counter() - started
    scheduler.stop()
    n = max(timed["steps"], 1)
    print(f"scheduler, {slots} AR rows: {wall / n * 1e3:.2f} ms per loop iteration, of which engine step + snapshot "
          f"{timed['engine'] / n * 1e3:.2f} ms; host work (prefill dispatch, token hand-off, text decoding, stop "
          f"strings) {(wall - timed['engine']) / n * 1e3:.2f} ms")


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the embedded model")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--modes", default="ar,diffusion,spec")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--block-width", type=int, default=None, help="nld-serve --block-width")
    p.add_argument("--block-length", type=int, default=None,
                   help="every request's block_length (and the baseline's); default the checkpoint's")
    p.add_argument("--max-len", type=int, default=None, help="nld-serve --max-len (default: the model's context)")
    p.add_argument("--ar-steps", nargs="+", default=["auto", "narrow", "wide"], choices=["auto", "narrow", "wide"])
    p.add_argument("--profile", action="store_true", help="also time each engine program in process")
    args = p.parse_args(argv)

    model = nld_jax.load(args.checkpoint)
    modes = args.modes.split(",")
    work = workload(args.requests, modes, args.block_length)
    print(f"nld-serve bench: {args.requests} requests ({'/'.join(modes)} in turn), max_tokens {args.max_tokens}, "
          f"{args.slots} slots, block width {args.block_width or 'default'}, block_length "
          f"{args.block_length or 'default'}, max-len {args.max_len or 'default'}, greedy; model {model.path}; "
          f"{os.cpu_count()} CPUs (shared machine: numbers vary)")
    header = (f"\n{'':26} {'conc':>4} {'req/s':>7} {'out tok/s':>9} {'x base':>6} {'TTFT ms p50/p90/p99':>20} "
              f"{'ITL ms p50/p90/p99':>19} {'tokens != generate':>18}")
    base = baseline(model, work, args.max_tokens)

    def row(label, concurrency, r, mismatched) -> None:  # printed as it is measured: a long run shows progress
        print(f"{label:26} {concurrency:>4} {r['rps']:7.2f} {r['tps']:9.1f} {r['tps'] / base['tps']:6.2f} "
              f"{r.get('ttft', '-'):>20} {r.get('itl', '-'):>19} {'-' if mismatched is None else mismatched:>18}",
              flush=True)

    print(header)
    row("generate, one at a time", "-", base, None)
    # Every server is started first and the configurations take turns at each concurrency, so
    # that a change in the machine's load over the run hits them alike.
    servers = {}
    try:
        for ar_steps in args.ar_steps:
            log = tempfile.NamedTemporaryFile("wb", prefix=f"serve-bench-{ar_steps}-", suffix=".log", delete=False)
            servers[ar_steps] = (*start_server(args, ar_steps, log), log)
        for concurrency in args.concurrency:
            for ar_steps, (_, port, _) in servers.items():
                result = run_load(port, work, args.max_tokens, concurrency)
                row(f"nld-serve {ar_steps}", concurrency, result,
                    sum(a != b for a, b in zip(result["tokens"], base["tokens"])))
    finally:
        for ar_steps, (process, _, log) in servers.items():
            code = stop_server(process)
            log.close()
            if code != 0:
                print(f"warning: nld-serve ({ar_steps}) exited with {code}; log: {log.name}")
    again = baseline(model, work, args.max_tokens)
    print(f"generate, one at a time, again at the end: {again['tps']:.1f} tokens/s (the load on the machine moved "
          f"by {again['tps'] / base['tps'] - 1:+.0%})")
    if args.profile:
        profile(model, sorted({1, 4, args.slots}), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
