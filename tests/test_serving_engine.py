"""The continuous-batching engine and its scheduler, without HTTP: every request decodes what
``nld_jax.generate`` gives it alone, whatever runs beside it, and slots, the queue, cancellation
and stop strings behave as the server relies on.

One engine (compiled once for the module) serves every test; each test drives it with a
scheduler of its own, one at a time (an engine has one driving thread).
"""

from __future__ import annotations

import time

import pytest

import nld_jax
from nld_jax.generate import resolve_settings
from nld_jax.serving.engine import Engine, EngineConfig, SlotSettings
from nld_jax.serving.scheduler import QueueFull, Request, Scheduler, ShuttingDown

TIMEOUT = 240.0  # seconds any one request may take here (a new program's compile on a loaded 2-core machine)
PROMPTS = ["def fib(n):", "import os", "Hello world, this is a test of the tiny model", "class A:\n    def f(self):"]
CHUNK = 16


@pytest.fixture(scope="module")
def engine(tiny):
    # programs="lazy": only the programs the tests use are compiled (the default also compiles
    # the common ones ahead, which tests do not need; the small server test covers it).
    engine = Engine(tiny, EngineConfig(slots=3, max_new_tokens=40, prefill_chunk=CHUNK, programs="lazy"))
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture
def scheduler(engine, tiny):
    s = Scheduler(engine, max_queue=32, tokenizer=tiny.tokenizer).start()
    yield s
    s.stop(drain=False)
    assert not s._thread.is_alive()


def settings(model, mode="ar", max_new=20, *, temperature=0.0, seed=0, block_length=None, threshold="auto",
             use_lora=False, stop_ids=()) -> SlotSettings:
    s = resolve_settings(model, mode, max_new, block_length, threshold, temperature, use_lora)
    return SlotSettings(mode=s.mode, max_new_tokens=s.max_new_tokens, block_length=s.block_length,
                        threshold=s.threshold, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                        use_lora=s.use_lora, seed=seed, stop_ids=tuple(stop_ids))


def alone(model, prompt: list[int], s: SlotSettings) -> tuple[list[int], int]:
    """What generate gives this request alone: its tokens (at most the budget: spec's last run may
    pass it inside the decode, the scheduler cuts there) and its forward count."""
    out = nld_jax.generate(model, [prompt], mode=s.mode, max_new_tokens=s.max_new_tokens,
                           block_length=s.block_length, threshold=s.threshold, temperature=s.temperature,
                           use_lora=s.use_lora, seed=s.seed, top_p=s.top_p, top_k=s.top_k,
                           stop_token_ids=list(s.stop_ids) or None)
    return out.tokens[0][:s.max_new_tokens], out.nfe[0]


MIXED = [  # (prompt index, mode, extra settings)
    (0, "ar", {}),
    (1, "diffusion", {}),
    (2, "spec", {}),
    (3, "spec", {"use_lora": True}),
    (0, "diffusion", {"threshold": None}),  # NVIDIA's top-k schedule, one token per forward
    (2, "ar", {"max_new": 13}),
    (1, "spec", {"temperature": 0.8, "seed": 11}),
    (3, "diffusion", {"block_length": 4, "temperature": 0.7, "seed": 5}),
    (0, "spec_quadratic", {"block_length": 4}),
    (2, "spec_quadratic", {}),  # the engine's widest quadratic block (8: 72 tokens a forward)
    (1, "spec_quadratic", {"block_length": 3, "temperature": 0.9, "seed": 3}),
]


def test_mixed_modes_side_by_side_equal_generate_alone(tiny, scheduler):
    tok = tiny.tokenizer
    cases = [(tok.encode(PROMPTS[p]), settings(tiny, mode, **extra)) for p, mode, extra in MIXED]
    assert max(len(p) for p, _ in cases) > CHUNK  # one prompt needs two prefill chunks
    jobs = [scheduler.submit(Request(p, s)) for p, s in cases]
    for job, (prompt, s) in zip(jobs, cases):
        job.result(TIMEOUT)
        tokens, nfe = alone(tiny, prompt, s)
        assert job.tokens == tokens, (s.mode, s)
        assert job.nfe == nfe, (s.mode, s)
        assert job.text == tok.decode(tokens)
        assert job.finish_reason == ("stop" if tokens[-1] == tiny.config.eos_token_id else "length")
        assert len(job.tokens) <= s.max_new_tokens


@pytest.mark.parametrize("dispatch_seconds", [0.0, 10.0], ids=["one-step-dispatches", "long-dispatches"])
def test_steps_per_dispatch_do_not_change_the_tokens(tiny, engine, dispatch_seconds):
    """The engine picks the steps of a dispatch from its timing (about 50 ms); one step per
    dispatch, and dispatches that end only when a row finishes, must give the same tokens."""
    scheduler = Scheduler(engine, tokenizer=tiny.tokenizer, dispatch_seconds=dispatch_seconds).start()
    try:
        cases = [(tiny.tokenizer.encode(PROMPTS[p]), settings(tiny, mode, n))
                 for p, mode, n in [(0, "ar", 20), (1, "diffusion", 8), (2, "spec", 12), (3, "ar", 16),
                                    (1, "spec_quadratic", 12)]]
        jobs = [scheduler.submit(Request(p, s)) for p, s in cases]
        for job, (prompt, s) in zip(jobs, cases):
            assert (job.result(TIMEOUT).tokens, job.nfe) == alone(tiny, prompt, s), s
    finally:
        scheduler.stop(drain=False)


def test_requests_admitted_together_decode_what_generate_does(tiny, engine):
    """Prompts of one bucket waiting together are prefilled and started in one program (2 at a
    time in a 3-slot engine; the third alone); each row then decodes what generate gives it."""
    from nld_jax.serving.engine import AdmitKey

    key = AdmitKey(2, 16, False)
    if key not in engine._programs:
        engine._build(key)
    before = engine.dispatched[key]
    prompts = [tiny.tokenizer.encode(p) for p in ("def fib(n):", "import os", "x = [1, 2]")]
    assert all(len(p) <= 16 for p in prompts)
    cases = list(zip(prompts, [settings(tiny, "spec", 16), settings(tiny, "ar", 12), settings(tiny, "diffusion", 16)]))
    scheduler = Scheduler(engine, tokenizer=tiny.tokenizer)  # not started: the three wait together
    jobs = [scheduler.submit(Request(p, s)) for p, s in cases]
    scheduler.start()
    try:
        for job, (prompt, s) in zip(jobs, cases):
            assert (job.result(TIMEOUT).tokens, job.nfe) == alone(tiny, prompt, s), s.mode
    finally:
        scheduler.stop(drain=False)
    assert engine.dispatched[key] == before + 1


def test_a_dispatch_ends_when_a_row_finishes(tiny, engine):
    """Two AR rows (AR: the prefill gives the first token, each step one more): the one of 3
    tokens finishes after 2 steps, and the dispatch stops there, however many steps it may run."""
    prompt = tiny.tokenizer.encode(PROMPTS[0])
    short, long = settings(tiny, "ar", 3), settings(tiny, "ar", 20)
    engine.admit(0, prompt, short)
    engine.admit(1, prompt, long)
    engine.snapshot()
    live = {0: short, 1: long}
    engine._seconds.clear()
    assert engine.step(live, dispatch_seconds=10.0) == 1  # nothing measured yet: one step
    assert engine.step(live, dispatch_seconds=10.0) == 1  # the short row's third token
    snap = engine.snapshot()
    assert snap.done[:2].tolist() == [True, False] and snap.n[:2].tolist() == [3, 3]
    assert engine.step({1: long}, dispatch_seconds=10.0) == 17  # the rest of the long row in one dispatch
    snap = engine.snapshot()
    assert snap.done[:2].tolist() == [True, True] and snap.n[:2].tolist() == [3, 20]
    assert snap.out[1, :20].tolist() == alone(tiny, prompt, long)[0]


def test_a_prompt_of_several_prefill_chunks(tiny, scheduler):
    prompt = (tiny.tokenizer.encode(" ".join(PROMPTS)) * 3)[:3 * CHUNK + 5]  # four chunks, the last partial
    for mode in ("ar", "spec"):
        s = settings(tiny, mode, 16)
        job = scheduler.submit(Request(prompt, s)).result(TIMEOUT)
        assert (job.tokens, job.nfe) == alone(tiny, prompt, s)


def test_rows_that_outgrow_their_cache_span(tiny):
    """Programs read the first 64, 96, 128, ... cache positions (min_span 64 here, 128 by default);
    a dispatch leaves its loop before a row would write past its span, and the row goes on in a
    program of a longer span. Each decodes what generate gives it alone."""
    engine = Engine(tiny, EngineConfig(slots=2, max_new_tokens=40, prefill_chunk=CHUNK, min_span=64,
                                       dispatch_seconds=10.0))
    assert engine.spans[:2] == [64, 96]
    scheduler = Scheduler(engine, tokenizer=tiny.tokenizer).start()
    try:
        prompt = tiny.tokenizer.encode(PROMPTS[2] + " " + PROMPTS[0])[:32]  # + 40 tokens: past 64 positions
        cases = [settings(tiny, "spec", 40), settings(tiny, "ar", 40)]
        jobs = [scheduler.submit(Request(prompt, s)) for s in cases]
        for job, s in zip(jobs, cases):
            assert (job.result(TIMEOUT).tokens, job.nfe) == alone(tiny, prompt, s), s.mode
    finally:
        scheduler.stop(drain=False)
    for group in ("block", "ar"):  # each started in the shortest span, then moved on
        spans = {k.span for k in engine.dispatched if k.group == group}
        assert len(spans) >= 2 and min(spans) == 64, engine.dispatched


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "spec_quadratic"])
def test_max_new_tokens_one(tiny, scheduler, mode):
    prompt = tiny.tokenizer.encode(PROMPTS[0])
    s = settings(tiny, mode, 1)
    job = scheduler.submit(Request(prompt, s)).result(TIMEOUT)
    assert len(job.tokens) == 1
    assert job.tokens == alone(tiny, prompt, s)[0]
    assert job.finish_reason in ("length", "stop")


def test_every_slot_is_reused_several_times(tiny, engine, scheduler):
    tok = tiny.tokenizer
    cases = [(tok.encode(PROMPTS[i % 4]), settings(tiny, ("ar", "diffusion", "spec")[i % 3], 8 + i))
             for i in range(4 * engine.config.slots)]
    expected = {}
    for prompt, s in cases:
        expected.setdefault((tuple(prompt), s), alone(tiny, prompt, s))
    jobs = [scheduler.submit(Request(p, s)) for p, s in cases]
    for job, (prompt, s) in zip(jobs, cases):
        job.result(TIMEOUT)
        assert (job.tokens, job.nfe) == expected[tuple(prompt), s]
    assert scheduler.slots_busy == 0 and scheduler.queue_depth == 0


def test_stop_strings_cut_the_text(tiny, scheduler):
    prompt = tiny.tokenizer.encode(PROMPTS[0])
    s = settings(tiny, "spec", 24)
    full = tiny.tokenizer.decode(alone(tiny, prompt, s)[0])
    stop = full[12:15]
    assert stop.strip() and full.find(stop) >= 1
    streamed = []
    job = Request(prompt, s, stop_strings=("never-there", stop), on_event=lambda e: streamed.append(e.text))
    scheduler.submit(job).result(TIMEOUT)
    assert job.text == full[:full.find(stop)]
    assert "".join(streamed) == job.text  # nothing of the stop string was ever shown
    assert job.finish_reason == "stop"


def test_stop_token_ids_end_a_request(tiny, scheduler):
    prompt = tiny.tokenizer.encode(PROMPTS[1])
    plain = alone(tiny, prompt, settings(tiny, "diffusion", 24))[0]
    s = settings(tiny, "diffusion", 24, stop_ids=(plain[5],))
    job = scheduler.submit(Request(prompt, s)).result(TIMEOUT)
    assert job.tokens == plain[:plain.index(plain[5]) + 1]
    assert job.finish_reason == "stop"


def test_a_cancelled_request_frees_its_slot(tiny, engine):
    # One step per dispatch: a cancel takes effect at the end of the running dispatch, and the
    # default dispatch (about 50 ms) could finish this tiny model's whole request first.
    scheduler = Scheduler(engine, max_queue=32, tokenizer=tiny.tokenizer, dispatch_seconds=0.0).start()
    try:
        _cancel_and_reuse(tiny, scheduler)
    finally:
        scheduler.stop(drain=False)


def _cancel_and_reuse(tiny, scheduler):
    prompt = tiny.tokenizer.encode(PROMPTS[2])
    long = settings(tiny, "diffusion", 40, threshold=None)  # one token per forward: the longest request
    job = scheduler.submit(Request(prompt, long))
    events = job.events(timeout=TIMEOUT)
    next(events)  # it is running
    job.cancel()
    job.result(TIMEOUT)
    assert job.finish_reason == "cancelled"  # 32 of its 40 forwards were left: the cancel comes long before
    deadline = time.monotonic() + 5
    while scheduler.slots_busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.slots_busy == 0
    # The freed rows decode the next requests exactly.
    cases = [(prompt, settings(tiny, m, 12)) for m in ("ar", "spec", "diffusion")]
    for p, s in cases:
        assert scheduler.submit(Request(p, s)).result(TIMEOUT).tokens == alone(tiny, p, s)[0]


def test_a_queued_request_can_be_cancelled(tiny, engine):
    s = Scheduler(engine, max_queue=4, tokenizer=tiny.tokenizer)  # not started: everything stays queued
    job = s.submit(Request(tiny.tokenizer.encode(PROMPTS[0]), settings(tiny, "ar", 4)))
    job.cancel()
    s.start()
    assert job.result(TIMEOUT).finish_reason == "cancelled"
    assert s.queue_depth == 0
    s.stop()


def test_a_full_queue_refuses_and_a_stopped_scheduler_too(tiny, engine):
    s = Scheduler(engine, max_queue=2, tokenizer=tiny.tokenizer)  # not started: submissions stay queued
    prompt = tiny.tokenizer.encode(PROMPTS[1])
    jobs = [s.submit(Request(prompt, settings(tiny, "spec", 6))) for _ in range(2)]
    with pytest.raises(QueueFull, match="limit is 2"):
        s.submit(Request(prompt, settings(tiny, "spec", 6)))
    assert s.metrics.rejected_total._value.get() == 1
    s.start()
    for job in jobs:
        assert job.result(TIMEOUT).finish_reason in ("length", "stop")
    s.submit(Request(prompt, settings(tiny, "ar", 2))).result(TIMEOUT)  # room again
    s.stop(drain=True)
    assert not s.accepting
    with pytest.raises(ShuttingDown):
        s.submit(Request(prompt, settings(tiny, "ar", 2)))


def test_too_long_a_request_is_refused_without_taking_a_queue_place(tiny, engine):
    s = Scheduler(engine, max_queue=1, tokenizer=tiny.tokenizer)
    prompt = tiny.tokenizer.encode(PROMPTS[2]) * 4  # 100 tokens of a 128-position context
    with pytest.raises(ValueError, match="exceeds the server's context of 128"):
        s.submit(Request(prompt, settings(tiny, "spec", 40)))
    assert s.queue_depth == 0
    s.submit(Request(prompt[:10], settings(tiny, "ar", 2)))  # the one queue place is still free
    s.start().stop(drain=True)
