"""``nld-serve``'s HTTP face: an OpenAI-compatible FastAPI app over a running :class:`Scheduler`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent
events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text).

The scheduler runs on a thread of its own; a request's events reach this event loop through
``loop.call_soon_threadsafe`` (:class:`_Bridge`), so no handler ever blocks the loop. A client
that goes away (mid-stream, or while waiting for a whole answer) cancels its request, which
frees its slot before the next engine step. Every handler answers errors in OpenAI's shape:
400 for bad input, 404 for another model's name, 429 (queue full) and 503 (draining) with
``Retry-After``, and 500 for anything unexpected, which is logged; no request can take the
server down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from nld_jax.serving import openai_schema as schema
from nld_jax.serving.openai_schema import APIError
from nld_jax.serving.scheduler import Event, QueueFull, Request as Job, Scheduler, ShuttingDown

__all__ = ["create_app"]

log = logging.getLogger("nld_jax.serving")

MAX_BODY_BYTES = 8 << 20  # a prompt the context can hold is far smaller; this only bounds memory
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting handler checks that its client is still there
RETRY_AFTER_SECONDS = "1"


class _Bridge:
    """The events of one request, from the scheduler's thread into this event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._getter: asyncio.Future | None = None

    def __call__(self, event: Event) -> None:
        # Runs on the scheduler's thread: it must never raise, or the engine would stop for everyone.
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next(self, http: Request) -> Event | None:
        """The next event, or None once the client has disconnected. The pending ``get`` is kept
        across polls (not cancelled by a timeout), so no event can be lost between them."""
        while True:
            if self._getter is None:
                self._getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._getter}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                event, self._getter = self._getter.result(), None
                return event
            if await http.is_disconnected():
                return None

    def close(self) -> None:
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


class _EventStream(StreamingResponse):
    """A streamed answer that cancels its request however the response ends (finished, client
    gone, task cancelled at shutdown); cancelling a finished request does nothing."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _guarded(handler):
    """Errors of a handler as OpenAI error responses; anything unexpected is a logged 500."""

    @functools.wraps(handler)
    async def run(http: Request):
        try:
            return await handler(http)
        except APIError as e:
            return _error_response(e)
        except Exception as e:
            log.exception("%s %s failed", http.method, http.url.path)
            return _error_response(APIError(500, f"internal server error: {type(e).__name__}: {e}",
                                            type="server_error"))

    return run


async def _json_body(http: Request):
    body = await http.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body has {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(scheduler: Scheduler, model, model_name: str) -> FastAPI:
    """The app serving ``model`` (named ``model_name`` in requests and responses) through
    ``scheduler``, which must be started (and warmed up, see :meth:`Engine.warmup`)."""
    engine = scheduler.engine
    app = FastAPI(title="nld-serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        return _error_response(APIError(e.status_code, f"{http.method} {http.url.path}: {e.detail}",
                                        code=None, headers=dict(e.headers or {})))

    def submit(parsed: schema.Parsed, bridge: _Bridge) -> Job:
        job = Job(parsed.prompt, parsed.settings, stop_strings=parsed.stop, on_event=bridge)
        try:
            return scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
        except ShuttingDown as e:
            raise APIError(503, f"{e}; retry on another replica or later", type="server_error",
                           code="shutting_down", headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
        except ValueError as e:  # too long for the context (the parser checks this first)
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None

    def failure(job: Job) -> APIError:
        return APIError(500, f"generation failed: {job.error}", type="server_error")

    async def answer(http: Request, parsed: schema.Parsed, chat: bool):
        bridge = _Bridge(asyncio.get_running_loop())
        job = submit(parsed, bridge)
        rid = schema.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            return _EventStream(_stream(http, job, bridge, parsed, rid, chat), job)
        try:
            while (event := await bridge.next(http)) is not None and event.kind != "done":
                pass
        finally:
            job.cancel()  # the client is gone, or the handler was cancelled; a no-op once finished
            bridge.close()
        if event is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        if job.finish_reason == "error":
            raise failure(job)
        body = (schema.chat_body if chat else schema.completion_body)(
            rid, model_name, job.text, job.finish_reason, schema.usage(len(parsed.prompt), job))
        return JSONResponse(body)

    async def _stream(http: Request, job: Job, bridge: _Bridge, parsed: schema.Parsed, rid: str, chat: bool):
        now = int(time.time())
        chunk = functools.partial(schema.chat_chunk if chat else schema.completion_chunk, rid, model_name, now)
        try:
            if chat:
                yield _sse(chunk({"role": "assistant", "content": ""}))
            while (event := await bridge.next(http)) is not None and event.kind != "done":
                if event.text:
                    yield _sse(chunk({"content": event.text} if chat else event.text))
            if event is None:
                return  # the client is gone; _EventStream cancels the request
            if job.finish_reason == "error":
                yield _sse(failure(job).body())
            else:
                yield _sse(chunk({} if chat else "", job.finish_reason))
                if parsed.include_usage:
                    yield _sse(chunk(None, use=schema.usage(len(parsed.prompt), job)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: the error goes in-band
            log.exception("stream %s failed", rid)
            yield _sse(APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error").body())
            yield "data: [DONE]\n\n"
        finally:
            bridge.close()

    @app.post("/v1/completions")
    @_guarded
    async def completions(http: Request):
        return await answer(http, schema.parse_completion(await _json_body(http), engine, model_name), chat=False)

    @app.post("/v1/chat/completions")
    @_guarded
    async def chat_completions(http: Request):
        return await answer(http, schema.parse_chat(await _json_body(http), engine, model_name), chat=True)

    @app.get("/v1/models")
    @_guarded
    async def models(http: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "nld-jax",
            "max_model_len": engine.max_len, "max_new_tokens": engine.config.max_new_tokens,
            "modes": list(engine.modes), "block_width": engine.width, "quad_block": engine.quad_block}]})

    @app.get("/health")
    @_guarded
    async def health(http: Request):
        if scheduler.crashed is not None:
            return JSONResponse({"status": "error", "message": str(scheduler.crashed)}, status_code=503)
        if not scheduler.accepting:
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_SECONDS})
        return JSONResponse({"status": "ok", "model": model_name, "slots": engine.config.slots,
                             "slots_busy": scheduler.slots_busy, "queue_depth": scheduler.queue_depth})

    @app.get("/metrics")
    @_guarded
    async def metrics(http: Request):
        text = scheduler.metrics.render(scheduler.queue_depth, scheduler.slots_busy, engine.config.slots,
                                        (engine.compilations, engine.programs_pending))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app
