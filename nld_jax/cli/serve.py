"""``nld-serve``: an OpenAI-compatible HTTP server with continuous batching, a mode per request.

Examples::

    nld-serve                                              # embedded default model on 127.0.0.1:8000
    nld-serve --checkpoint /ckpt/NLD-8B --dtype bfloat16 --slots 16 --max-len 4096 --port 8080
    nld-serve --checkpoint tests/data/nld-tiny --port 0    # any free port (printed when ready)

    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def fib(n):", "max_tokens": 64, "mode": "spec"}'

Startup loads the model, compiles the engine's prefill and start programs and one step
program per step group that serves every case (so that no request waits for a compilation; the
smaller, faster step programs compile in the background, see ``nld_jax/serving/engine.py``) and
then prints one ``ready`` line. SIGTERM (or Ctrl-C) drains: running and queued requests finish,
new ones get 503, then the process exits 0; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

PROG = "nld-serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--checkpoint", help="checkpoint directory (HF safetensors or converted Orbax); "
                                        "default: the embedded model")
    p.add_argument("--model-name", help="the model's name in requests and responses (default: the checkpoint "
                                        "directory's name, or nld-default)")
    p.add_argument("--mesh", help="shard the weights over a mesh, e.g. data=1,tensor=2 (default: one device)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--slots", type=int, default=8, help="requests decoded side by side (default %(default)s)")
    p.add_argument("--max-len", type=int, default=None,
                   help="context per request: prompt + new tokens (default: the model's, at most 2048)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="the largest max_tokens a request may ask for (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default %(default)s)")
    p.add_argument("--block-width", type=int, default=None,
                   help="the widest block_length of diffusion and spec requests (default: the checkpoint's "
                        "block_size); their programs compute this many tokens per row, so a narrower width is cheaper")
    p.add_argument("--quad-block", type=int, default=None,
                   help="the widest block_length of spec_quadratic requests (default: min(block width, 8)); its "
                        "forwards are C*(C+1) tokens per row; 0 serves no spec_quadratic")
    p.add_argument("--dispatch-ms", type=float, default=50.0,
                   help="about how long one engine dispatch (several decode steps on the device) runs before "
                        "the host hands out tokens and admits requests (default %(default)s)")
    p.add_argument("--programs", choices=("ahead", "lazy", "eager"), default="ahead",
                   help="ahead (default): compile one universal step program per group at startup, then in the "
                        "background the common smaller ones and any other when first needed; lazy: only those "
                        "first needed; eager: all of them at startup (minutes on a CPU)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument("--compile-cache", default=None,
                   help="directory of JAX's persistent compilation cache, so that a restart loads the step programs "
                        "instead of compiling them (default: $JAX_COMPILATION_CACHE_DIR if set, else "
                        "~/.cache/nld-jax/xla; 'none' disables it)")
    p.add_argument("--implementation", "--kernels", dest="implementation", default="auto",
                   help="attention / greedy-head implementation: 'auto' (default), 'xla' or a Pallas kernel name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 = any free port)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds a SIGTERM waits for running and queued requests (default %(default)s)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                   help="uvicorn's log level (default %(default)s); request failures are always logged")
    return p


def _bind(host: str, port: int) -> socket.socket:
    """The listening address, bound now (so a taken port fails before minutes of compilation)
    but not listening until the server starts (clients are refused, not left hanging)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache: ``directory``, else the environment's, else a user cache."""
    import jax

    if directory is None:
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return  # JAX reads it itself
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "nld-jax", "xla")
    if directory.lower() == "none":
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _model_name(args) -> str:
    if args.model_name:
        return args.model_name
    return os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint else "nld-default"


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with a drain in front of its graceful shutdown: on the first SIGTERM /
        SIGINT the scheduler stops taking requests (new ones get 503 while it finishes the
        running and queued ones), then uvicorn closes its connections once their responses are
        written. The signal is not re-raised afterwards, so a drained server exits 0."""

        def __init__(self, config, scheduler, drain_timeout: float, ready_line):
            super().__init__(config)
            self.scheduler, self.drain_timeout, self.ready_line = scheduler, drain_timeout, ready_line
            self.draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining:  # a second signal: stop now
                self.force_exit = self.should_exit = True
                return
            self.draining = True
            print(f"{PROG}: draining (running and queued requests finish; new ones get 503)", file=sys.stderr,
                  flush=True)
            threading.Thread(target=self._drain, name="nld-serve-drain", daemon=True).start()

        def _drain(self) -> None:
            self.scheduler.stop(drain=True, timeout=self.drain_timeout)
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                port = (sockets or [s for srv in self.servers for s in srv.sockets])[0].getsockname()[1]
                print(self.ready_line(port), flush=True)

    return DrainingServer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    logging.getLogger("nld_jax.serving").setLevel(logging.INFO)
    try:
        import uvicorn

        import nld_jax
        from nld_jax.serving.engine import Engine, EngineConfig
        from nld_jax.serving.metrics import Metrics
        from nld_jax.serving.scheduler import Scheduler
        from nld_jax.serving.server import create_app

        _compilation_cache(args.compile_cache)
        # Arguments first: a typo must not wait for a checkpoint to load.
        if args.max_queue < 1:  # every request passes through the queue, even into a free slot
            raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
        if args.max_len is not None and args.max_len < 2:
            raise ValueError(f"--max-len must be >= 2, got {args.max_len}")
        if args.block_width is not None and args.block_width < 1:
            raise ValueError(f"--block-width must be >= 1, got {args.block_width}")
        if args.quad_block is not None and (args.quad_block < 0 or args.quad_block == 1):
            raise ValueError(f"--quad-block must be 0 or >= 2, got {args.quad_block}")
        if not 0 < args.dispatch_ms <= 60000:
            raise ValueError(f"--dispatch-ms must be in (0, 60000], got {args.dispatch_ms}")
        config = EngineConfig(slots=args.slots, max_len=args.max_len, max_new_tokens=args.max_new_tokens,
                              block_width=args.block_width, quad_block=args.quad_block,
                              prefill_chunk=args.prefill_chunk, implementation=args.implementation,
                              dispatch_seconds=args.dispatch_ms / 1000, programs=args.programs)
        mesh = None
        if args.mesh:
            from nld_jax.sharding import mesh_from_spec

            mesh = mesh_from_spec(args.mesh)
        model = nld_jax.load(args.checkpoint, dtype=args.dtype, mesh=mesh)
        engine = Engine(model, config)
        started = time.perf_counter()
        engine.warmup()
        print(f"{PROG}: compiled the engine's programs in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError and ShardingError are ValueErrors
        sock.close()
        return fail(e)
    except KeyboardInterrupt:
        sock.close()
        return fail("interrupted during startup")

    name = _model_name(args)
    scheduler = Scheduler(engine, max_queue=args.max_queue, tokenizer=model.tokenizer, metrics=Metrics()).start()
    app = create_app(scheduler, model, name)
    http_config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off",
                                 timeout_graceful_shutdown=30, timeout_keep_alive=5)

    def ready(port: int) -> str:
        return (f"{PROG}: ready on http://{args.host}:{port} (model {name}, {args.slots} slots, "
                f"context {engine.max_len}, block width {engine.width}, spec_quadratic block "
                f"{engine.quad_block or 'off'})")

    server = _server_class()(http_config, scheduler, args.drain_timeout, ready)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop(drain=not server.force_exit, timeout=args.drain_timeout)
        engine.close()
        sock.close()
    if scheduler.crashed is not None:
        return fail(f"the engine stopped: {scheduler.crashed}")
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
