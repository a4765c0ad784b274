"""``nld-serve`` end to end: a real server process on loopback, called with the official
``openai`` client (and raw HTTP where the status line and headers are the point).

Each answer is checked against ``nld_jax.generate`` of that request alone in this process. One
server (4 slots) serves most tests; a second one (1 slot, a queue of 6) is for the full queue
and, last, for the SIGTERM drain. Every request is bounded in time (client ``timeout``, no
retries), and every server process is stopped by its fixture, whatever happens.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

import nld_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "nld-tiny"
MODEL = "nld-tiny"
STARTUP_SECONDS = 240  # a cold compile on a busy 2-core machine; the compilation cache makes it seconds
REQUEST_SECONDS = 30


# ---------------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("nld-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nld_jax.cli.serve"]


class Server:
    def __init__(self, log: pathlib.Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ)
        # The server compiles what the test process compiled before it: share the persistent cache.
        if not env.get("JAX_COMPILATION_CACHE_DIR"):
            env.update(JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(_command() + ["--checkpoint", str(TINY), "--port", str(self.port), *args],
                                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"nld-serve exited with {self.process.returncode} during startup:\n{self.output()}")
            try:
                if get(self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"nld-serve was not ready within {STARTUP_SECONDS} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def client(self, timeout: float = REQUEST_SECONDS) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Dispatches of about 5 ms (a few steps of this tiny model): a closed stream is cancelled
    # before its request could finish (the default 50 ms would run a whole request in two). The
    # small server runs with the default.
    # --programs lazy: no compiling ahead of need (the small server runs the default).
    s = Server(tmp_path_factory.mktemp("serve") / "server.log", "--slots", "4", "--max-new-tokens", "64",
               "--model-name", MODEL, "--dispatch-ms", "5", "--programs", "lazy")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "small.log", "--slots", "1", "--max-queue", "6",
               "--max-new-tokens", "64", "--model-name", MODEL)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


# ---------------------------------------------------------------------- helpers


def _call(request: urllib.request.Request, timeout: float):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get(url: str, timeout: float = REQUEST_SECONDS):
    return _call(urllib.request.Request(url), timeout)


def post(url: str, body, timeout: float = REQUEST_SECONDS):
    """``(status, headers, parsed JSON)``; ``body`` as bytes is sent as it is (invalid JSON too)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, raw = _call(urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}),
                                 timeout)
    return status, headers, json.loads(raw)


def metric(server: Server, name: str, labels: str = "") -> float:
    text = get(server.url + "/metrics")[2].decode()
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+)"
    found = re.search("^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


def expected(tiny, prompt, mode="ar", max_tokens=16, **kw):
    """What generate gives this request alone (at most max_tokens: the server cuts spec's overshoot)."""
    ids = tiny.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    out = nld_jax.generate(tiny, [ids], mode=mode, max_new_tokens=max_tokens, **kw)
    tokens = out.tokens[0][:max_tokens]
    return tiny.tokenizer.decode(tokens), len(tokens), out.nfe[0]


def chat_prompt(tiny, messages) -> list[int]:
    """nld-tiny has no chat template: the server's fallback rendering."""
    return tiny.tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")


# ---------------------------------------------------------------------- answers


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, _, body = get(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = get(server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"nld_slots 4.0" in body and b"nld_queue_depth" in body


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "spec_quadratic"])
def test_completion_equals_generate(tiny, client, mode):
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=24, extra_body={"mode": mode})
    text, n, nfe = expected(tiny, "def fib(n):", mode, 24)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert (r.usage.completion_tokens, r.usage.prompt_tokens) == (n, len(tiny.tokenizer.encode("def fib(n):")))
    assert r.usage.model_extra["forwards"] == nfe
    assert r.usage.model_extra["tokens_per_forward"] == pytest.approx(n / nfe, abs=1e-4)


def test_completion_of_token_ids_streamed(tiny, client):
    ids = tiny.tokenizer.encode("import os")
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"mode": "spec"}))
    text, n, nfe = expected(tiny, ids, "spec", 20)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.model_extra["forwards"] == nfe
    assert len({c.id for c in chunks}) == 1


def test_chat_streamed_and_not(tiny, client):
    messages = [{"role": "system", "content": "Write code."}, {"role": "user", "content": "class A:"}]
    text, n, _ = expected(tiny, chat_prompt(tiny, messages), "diffusion", 24)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=24,
                                       extra_body={"mode": "diffusion"})
    assert r.object == "chat.completion"
    assert (r.choices[0].message.role, r.choices[0].message.content) == ("assistant", text)
    assert r.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stream=True,
                                                 extra_body={"mode": "diffusion"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": 4, "stream": True}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_SECONDS) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


MIXED = [  # (prompt, mode, max_tokens, NLD fields)
    ("def fib(n):", "ar", 20, {}), ("import os", "diffusion", 20, {}), ("class A:", "spec", 20, {}),
    ("def fib(n):", "spec", 20, {"use_lora": True}), ("for i in", "diffusion", 20, {"threshold": None}),
    ("import os", "ar", 9, {}), ("x = [", "diffusion", 20, {"block_length": 4}),
    ("while True:", "spec", 20, {"block_length": 3}), ("class A:", "spec_quadratic", 20, {"block_length": 4}),
]


def test_concurrent_mixed_modes_equal_generate_alone(tiny, server):
    cases = [({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "mode": mode, **extra},
              expected(tiny, prompt, mode, max_tokens, **extra)) for prompt, mode, max_tokens, extra in MIXED]

    def one(case):
        body, (text, n, nfe) = case
        status, _, r = post(server.url + "/v1/completions", body)
        assert status == 200, r
        assert r["choices"][0]["text"] == text, body
        assert (r["usage"]["completion_tokens"], r["usage"]["forwards"]) == (n, nfe), body
        return body["mode"]

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        assert sorted(pool.map(one, cases, timeout=4 * REQUEST_SECONDS)) == sorted(b["mode"] for b, _ in cases)


def test_sampled_request_equals_generate_with_its_seed(tiny, client):
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=20, temperature=0.9, top_p=0.95,
                                  seed=1234, extra_body={"mode": "spec", "top_k": 50})
    text, n, nfe = expected(tiny, "def fib(n):", "spec", 20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    assert r.choices[0].text == text and r.usage.model_extra["forwards"] == nfe
    again = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=20, temperature=0.9,
                                      top_p=0.95, seed=1234, extra_body={"mode": "spec", "top_k": 50})
    assert again.choices[0].text == text


def test_stop_strings(tiny, client):
    full, _, _ = expected(tiny, "def fib(n):", "ar", 24)
    stop = full[10:13]
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=24, stop=["zzz", stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------- bad input


LONG = list(range(4, 124))  # 120 token ids of a 128-position context
BAD = [  # (path, body, status, param)
    ("completions", {"prompt": "x", "mode": "turbo"}, 400, "mode"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("completions", {"prompt": [1, 2.5]}, 400, "prompt"),
    ("completions", {"prompt": LONG, "max_tokens": 20}, 400, "prompt"),
    ("completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 8.0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ("completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_k": -3}, 400, "top_k"),
    ("completions", {"prompt": "x", "threshold": 2}, 400, "threshold"),
    ("completions", {"prompt": "x", "threshold": "high"}, 400, "threshold"),
    ("completions", {"prompt": "x", "mode": "spec", "block_length": 1}, 400, "block_length"),
    ("completions", {"prompt": "x", "mode": "diffusion", "block_length": 64}, 400, "block_length"),
    ("completions", {"prompt": "x", "mode": "spec_quadratic", "block_length": 9}, 400, "block_length"),
    ("completions", {"prompt": "x", "mode": "spec_quadratic", "block_length": 1}, 400, "block_length"),
    ("completions", {"prompt": "x", "use_lora": "yes"}, 400, "use_lora"),
    ("completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("completions", {"prompt": "x", "seed": "1"}, 400, "seed"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("completions", {"prompt": "x", "stop_token_ids": [1, "2"]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0]"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    got, _, r = post(f"{server.url}/v1/{path}", body)
    assert got == status, r
    assert set(r) == {"error"} and set(r["error"]) == {"message", "type", "param", "code"}
    assert r["error"]["param"] == param and r["error"]["message"]
    assert r["error"]["type"] == "invalid_request_error"


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"mode": "fast"})
    assert e.value.body["param"] == "mode" and "unknown mode" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="another-model", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.get("/nothing-here", cast_to=object)


def test_unknown_fields_are_ignored(server):
    status, _, r = post(server.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                         "frobnicate": {"a": 1}, "user": "someone"})
    assert status == 200 and r["usage"]["completion_tokens"] <= 2


# ---------------------------------------------------------------------- cancellation


def test_a_closed_stream_frees_its_slot(server, client):
    before = metric(server, "nld_requests_total", 'mode="diffusion",status="cancelled"')
    # the answer (~80 bytes) is longer than max_tokens: the request cannot end on its own first
    stream = client.completions.create(model=MODEL, prompt="letter: to=socket from=thread item=buffer day=friday =",
                                       max_tokens=64, stream=True,
                                       extra_body={"mode": "diffusion", "threshold": None})  # 1 token a forward
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        cancelled = metric(server, "nld_requests_total", 'mode="diffusion",status="cancelled"')
        if cancelled > before and metric(server, "nld_slots_busy") == 0:
            break
        time.sleep(0.05)
    assert cancelled == before + 1
    assert metric(server, "nld_slots_busy") == 0
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2


# ---------------------------------------------------------------------- load, queue and shutdown


def test_a_full_queue_gets_429_with_retry_after(small_server):
    body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 64, "mode": "diffusion", "threshold": None}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post(small_server.url + "/v1/completions", body), range(16),
                                timeout=8 * REQUEST_SECONDS))
    refused = [(h, r) for status, h, r in answers if status == 429]
    assert refused and all(status in (200, 429) for status, _, _ in answers)
    assert len(answers) - len(refused) >= 7  # the slot and the six queue places
    headers, r = refused[0]
    assert headers["Retry-After"] == "1"
    assert r["error"]["type"] == "rate_limit_error" and r["error"]["code"] == "queue_full"
    assert metric(small_server, "nld_requests_rejected_total") == len(refused)


def test_sigterm_drains_then_exits_0(small_server):
    url = small_server.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 64, "mode": "diffusion", "threshold": None}
    submitted = metric(small_server, "nld_requests_submitted_total", 'mode="diffusion"')
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(post(url, body))) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + REQUEST_SECONDS
    while metric(small_server, "nld_requests_submitted_total", 'mode="diffusion"') < submitted + 6:
        assert time.monotonic() < deadline, "the requests were not accepted"
        time.sleep(0.01)
    small_server.process.send_signal(signal.SIGTERM)  # about 6 x 64 forwards are still to run
    status, headers, r = post(url, body)
    assert status == 503, r
    assert headers["Retry-After"] == "1" and r["error"]["code"] == "shutting_down"
    assert get(small_server.url + "/health")[0] == 503
    assert small_server.process.wait(60) == 0, small_server.output()
    for t in threads:
        t.join(REQUEST_SECONDS)
    assert [status for status, _, _ in answers] == [200] * 6
    assert all(r["usage"]["completion_tokens"] == 64 or r["choices"][0]["finish_reason"] == "stop"
               for _, _, r in answers)
    assert "draining" in small_server.output()


# ---------------------------------------------------------------------- a handler that fails


def test_an_exception_in_a_handler_is_a_500_and_the_server_lives_on(tiny):
    """In process: a scheduler whose submit raises stands for any bug behind a handler."""
    import uvicorn

    from nld_jax.serving.engine import Engine, EngineConfig
    from nld_jax.serving.scheduler import Scheduler
    from nld_jax.serving.server import create_app

    class Broken(Scheduler):
        def submit(self, request):
            raise RuntimeError("boom")

    scheduler = Broken(Engine(tiny, EngineConfig(slots=1, max_new_tokens=8)))  # never started, never compiled
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, tiny, MODEL), host="127.0.0.1", port=port,
                                           log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        for _ in range(2):
            status, _, r = post(url + "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert status == 500 and r["error"]["type"] == "server_error" and "boom" in r["error"]["message"]
        assert get(url + "/health")[0] == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_server_without_spec_quadratic_refuses_it_by_name(tiny):
    """nld-serve --quad-block 0: the mode is known but not served (the body is parsed in process)."""
    from nld_jax.serving import openai_schema as schema
    from nld_jax.serving.engine import Engine, EngineConfig

    engine = Engine(tiny, EngineConfig(slots=1, max_new_tokens=8, quad_block=0))  # never compiled
    assert "spec_quadratic" not in engine.modes
    with pytest.raises(schema.APIError) as e:
        schema.parse_completion({"prompt": "x", "mode": "spec_quadratic"}, engine, MODEL)
    assert (e.value.status, e.value.param) == (400, "mode") and "--quad-block 0" in e.value.message
    assert schema.parse_completion({"prompt": "x", "mode": "spec"}, engine, MODEL).settings.mode == "spec"
