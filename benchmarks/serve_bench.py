"""Serving throughput on loopback: ``nld-serve`` under a bounded load, against ``nld_jax.generate``
called one request at a time in the same run (the baseline of the ratio).

The load is ``--requests`` greedy completions (modes in turn, code prompts, ``--max-tokens``
each), sent by ``--concurrency`` client threads that stream every answer (SSE) so that the time
to the first token (TTFT) and the time per output token after it (ITL: (last - first chunk) /
(tokens - 1), per request) can be read. The server is one ``nld-serve`` process (extra
arguments in ``--serve-args``), started before the load; an untimed warm-up load at each
concurrency lets it compile the step programs that load needs (in the background, see
``nld_jax/serving/engine.py``), and the bench waits until none is pending. Every answer's
token count is checked against the baseline's (greedy: they must be equal), and the step
programs the server compiled during the timed loads are counted (0 expected). The baseline
runs before and after each timed load, and the ratio (``x base``) is over their mean: on a
shared machine the load moves during a run, and this way it moves both sides alike.
``--profile`` adds, in process, each mode's cost per forward inside ``generate`` at batch
1 / 4 / 16 next to the engine's step program at the same number of rows (the bound on what
batching can gain on this machine) and the scheduler's host time per iteration.

    python benchmarks/serve_bench.py                                    # 64 requests, concurrency 1 4 16
    python benchmarks/serve_bench.py --profile --requests 0             # the per-forward costs only
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
from nld_jax.loading import STDLIB_CHECKPOINT

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


def start_server(args, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "nld_jax.cli.serve", "--port", str(port), "--slots", str(args.slots),
               "--max-new-tokens", str(args.max_tokens), "--max-queue", str(max(args.requests, 16)),
               "--model-name", "bench", *args.serve_args.split()]
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


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def warm(port: int, work: list[dict], max_tokens: int, concurrencies: list[int]) -> float:
    """An untimed load at each concurrency, then wait for the background compiler; its seconds."""
    started = time.perf_counter()
    for concurrency in concurrencies:
        run_load(port, work[:max(2 * concurrency, 4)], max_tokens, concurrency)
    deadline = time.monotonic() + 900
    while metric(port, "nld_programs_pending") > 0 and time.monotonic() < deadline:
        time.sleep(1)
    return time.perf_counter() - started


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


def matmul_roofline(model, token_counts: list[int], repeats: int = 5) -> None:
    """GFLOP/s of the model's MLP matmuls (up and down projection) for ``token_counts`` tokens: an
    AR row is 1 token a forward, a block row 32, sixteen block rows 512. When a block row alone
    already runs near the rate of sixteen, batching block rows cannot gain much on this machine."""
    import jax
    import jax.numpy as jnp

    D, F = model.config.hidden_size, model.config.intermediate_size
    rates = []
    for m in token_counts:
        x, up, down = jnp.ones((m, D)), jnp.ones((D, F)), jnp.ones((F, D))
        run = jax.jit(lambda x, up, down: jax.lax.fori_loop(0, 50, lambda i, y: (y @ up) @ down * 1e-3, x))
        run(x, up, down).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            run(x, up, down).block_until_ready()
            best = min(best, time.perf_counter() - t)
        rates.append(f"{m} tokens {50 * 4 * m * D * F / best / 1e9:.0f}")
    print(f"MLP matmuls [tokens, {D}] x [{D}, {F}] x [{F}, {D}], GFLOP/s: {', '.join(rates)}")


def profile(model, args, batches=(1, 4, 16), steps: int = 8, repeats: int = 3) -> None:
    """Per mode and batch: ms per forward inside ``generate`` (a while_loop on the device: the
    cost of the forward itself), and of the engine's step program for that many rows (span 128,
    ``steps`` steps per dispatch, and its gather / write-back alone), best of ``repeats``; then
    ``x max`` = batch * generate(batch 1) / engine(batch), the most a full batch of that mode can
    gain over one-at-a-time ``generate`` on this machine. Then the matmul rates behind it
    (:func:`matmul_roofline`) and the scheduler's host time per iteration."""
    import jax
    import numpy as np

    from nld_jax.serving.engine import Engine, EngineConfig, ProgramKey, SlotSettings
    from nld_jax.serving.scheduler import Request, Scheduler

    slots = max(batches)
    engine = Engine(model, EngineConfig(slots=slots, max_new_tokens=args.max_tokens, max_len=args.max_len,
                                        block_width=args.block_width, quad_block=0))
    engine.warmup()
    prompt = PROMPTS[3]
    ids = model.tokenizer.encode(prompt)
    block = args.block_length or engine.width
    print(f"\nprofile (in process; ms per forward, best of {repeats}; prompt {prompt!r}, max_tokens "
          f"{args.max_tokens}, block_length {block})")
    print(f"{'mode':>10} {'batch':>5} {'generate':>9} {'engine':>8} {'gather+write-back':>18} {'x max':>6}")
    for mode in args.modes.split(","):
        group = "ar" if mode == "ar" else "block"
        settings = SlotSettings(mode=mode, max_new_tokens=args.max_tokens, block_length=1 if mode == "ar" else block,
                                threshold=0.9 if mode == "diffusion" else None)
        single = None
        for b in batches:
            gen = []
            for _ in range(repeats + 1):
                out = nld_jax.generate(model, [prompt] * b, mode=mode, max_new_tokens=args.max_tokens,
                                       block_length=None if mode == "ar" else block)
                # forwards in the loop: nfe counts the prefill too, except in diffusion
                gen.append(out.seconds / max(max(out.nfe) - (mode != "diffusion"), 1))
            key = ProgramKey(group, b, 128, False)
            program = engine._programs.get(key) or engine._build(key)
            idx = np.arange(b, dtype=np.int32)
            timed = {0: [], steps: []}
            for _ in range(repeats):
                for n in timed:
                    for slot in range(b):
                        engine.admit(slot, ids, settings)
                    jax.block_until_ready(engine.state)
                    t = time.perf_counter()
                    engine.state, ran = program(model.params, model.lora, engine.state, idx, np.int32(n))
                    ran = int(ran)
                    timed[n].append((time.perf_counter() - t) / max(ran, 1))
            for slot in range(b):
                engine.retire(slot)
            g, e, overhead = min(gen[1:]), min(timed[steps]), min(timed[0])
            single = single or g
            print(f"{mode:>10} {b:>5} {g * 1e3:9.2f} {e * 1e3:8.2f} {overhead * 1e3:18.2f} {b * single / e:6.2f}",
                  flush=True)
    matmul_roofline(model, [1, 32, 16 * 32])
    # Host work of the scheduler per iteration, with all slots busy in AR (the cheapest device step).
    scheduler = Scheduler(engine, max_queue=4 * slots, tokenizer=model.tokenizer)
    timed = {"engine": 0.0, "iterations": 0, "steps": 0}
    inner_step, inner_snapshot = engine.step, engine.snapshot

    def step(live, dispatch_seconds=None):
        t = time.perf_counter()
        ran = inner_step(live, dispatch_seconds)
        timed["engine"] += time.perf_counter() - t
        timed["iterations"] += 1
        timed["steps"] += ran
        return ran

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
    engine.close()
    n = max(timed["iterations"], 1)
    print(f"scheduler, {slots} AR rows: {n} iterations of {timed['steps'] / n:.1f} steps, {wall / n * 1e3:.2f} ms "
          f"each, of which engine dispatch + snapshot {timed['engine'] / n * 1e3:.2f} ms; host work (prefill "
          f"dispatch, token hand-off, text decoding, stop strings) {(wall - timed['engine']) / n * 1e3:.2f} ms")


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=STDLIB_CHECKPOINT,
                   help="default: the embedded stdlib model (free-form code, the README's serving numbers)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--modes", default="ar,diffusion,spec")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--block-width", type=int, default=None, help="nld-serve --block-width")
    p.add_argument("--block-length", type=int, default=None,
                   help="every request's block_length (and the baseline's); default the checkpoint's")
    p.add_argument("--max-len", type=int, default=None, help="nld-serve --max-len (default: the model's context)")
    p.add_argument("--serve-args", default="", help="more nld-serve arguments, e.g. '--dispatch-ms 20'")
    p.add_argument("--profile", action="store_true", help="also time generate and the engine's programs in process")
    args = p.parse_args(argv)

    model = nld_jax.load(args.checkpoint)
    modes = args.modes.split(",")
    if args.requests > 0:
        load(model, args, modes)
    if args.profile:
        profile(model, args)
    return 0


def load(model, args, modes: list[str]) -> None:
    """The server at each concurrency, each run between two runs of the baseline (before and
    after: the ratio is over their mean, so that a change in the machine's load hits both sides)."""
    work = workload(args.requests, modes, args.block_length)
    print(f"nld-serve bench: {args.requests} requests ({'/'.join(modes)} in turn), max_tokens {args.max_tokens}, "
          f"{args.slots} slots, block width {args.block_width or 'default'}, block_length "
          f"{args.block_length or 'default'}, max-len {args.max_len or 'default'}, serve args "
          f"{args.serve_args or '-'}, greedy; model {model.path}; {os.cpu_count()} CPUs (shared machine: numbers vary)",
          flush=True)
    log = tempfile.NamedTemporaryFile("wb", prefix="serve-bench-", suffix=".log", delete=False)
    process = None
    try:
        process, port = start_server(args, log)
        seconds = warm(port, work, args.max_tokens, args.concurrency)
        compiled = metric(port, "nld_programs_compiled")
        print(f"(server warm-up load and background compilation: {seconds:.0f} s, {compiled:.0f} programs compiled)")
        print(f"\n{'':10} {'conc':>4} {'req/s':>7} {'out tok/s':>9} {'generate before/after':>21} {'x base':>6} "
              f"{'TTFT ms p50/p90/p99':>20} {'ITL ms p50/p90/p99':>19} {'tokens != generate':>18}", flush=True)
        before = baseline(model, work, args.max_tokens)
        for concurrency in args.concurrency:
            r = run_load(port, work, args.max_tokens, concurrency)
            after = baseline(model, work, args.max_tokens)
            base = (before["tps"] + after["tps"]) / 2
            mismatched = sum(a != b for a, b in zip(r["tokens"], before["tokens"]))
            print(f"{'nld-serve':10} {concurrency:>4} {r['rps']:7.2f} {r['tps']:9.1f} "
                  f"{before['tps']:>10.1f}/{after['tps']:<10.1f} {r['tps'] / base:6.2f} {r['ttft']:>20} "
                  f"{r['itl']:>19} {mismatched:>18}", flush=True)
            before = after
        print(f"programs compiled during the timed loads: {metric(port, 'nld_programs_compiled') - compiled:.0f}")
    finally:
        if process is not None:
            code = stop_server(process)
            if code != 0:
                print(f"warning: nld-serve exited with {code}; log: {log.name}")
        log.close()


if __name__ == "__main__":
    sys.exit(main())
