"""OpenAI's wire format: request bodies in, responses and stream chunks out.

A body is parsed by hand rather than by a pydantic model because the errors must be OpenAI's
(``{"error": {"message", "type", "param", "code"}}``, status 400) and must name the field the
client sent (``max_tokens``, not the library's ``max_new_tokens``). Unknown fields are ignored,
as OpenAI does; known OpenAI fields this server cannot honour (``logprobs``, ``echo``, ``n > 1``,
penalties, tools) are refused when set to anything but their default, so that no client silently
gets less than it asked for. Every number goes through :mod:`nld_jax.validation` and the
decoding settings through :func:`nld_jax.generate.resolve_settings`, so the server and
``generate`` accept exactly the same values.

NLD's own fields ride in the body: ``mode`` ("ar" | "diffusion" | "spec" | "spec_quadratic"), ``block_length``,
``threshold`` (a number, null for diffusion's top-k schedule, or "auto"), ``use_lora``,
``top_k`` and ``stop_token_ids``.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
import uuid

from nld_jax import validation
from nld_jax.decode import context_needed
from nld_jax.generate import resolve_settings
from nld_jax.serving.engine import Engine, SlotSettings

__all__ = ["APIError", "Parsed", "SERVED_MODES", "parse_completion", "parse_chat", "new_id", "usage",
           "completion_body", "chat_body", "completion_chunk", "chat_chunk"]

SERVED_MODES = ("ar", "diffusion", "spec", "spec_quadratic")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
_ABSENT = object()

# OpenAI fields this server does not implement, and the values that mean "not asked for".
_UNSUPPORTED = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
    "top_logprobs": (None, 0), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}
# Library argument names as they appear in resolve_settings' messages -> the body's field names,
# the most specific first ("spec mode needs block_length >= 2" is about block_length).
_LIBRARY_FIELDS = {"block_length": "block_length", "threshold": "threshold", "temperature": "temperature",
                   "top_p": "top_p", "top_k": "top_k", "use_lora": "use_lora", "max_new_tokens": "max_tokens",
                   "mode": "mode"}


class APIError(Exception):
    """An error answered in OpenAI's shape; ``headers`` carry ``Retry-After`` for 429 / 503."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class Parsed:
    """One request, ready for the scheduler."""

    prompt: list[int]
    settings: SlotSettings
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------- fields


def _checked(param: str, check, *args, **kwargs):
    """Run a validator; its ValueError becomes a 400 naming ``param``."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise _bad(str(e), param) from None


def _get(body: dict, name: str, default=None):
    value = body.get(name, _ABSENT)
    return default if value is _ABSENT or value is None else value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = _get(body, name, default)
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _is_default(value, defaults: tuple) -> bool:
    # true must not pass as 1, nor 0 as False (a completions logprobs=0 still asks for logprobs).
    return any(value is None if d is None else
               (isinstance(value, bool) == isinstance(d, bool) and value == d) for d in defaults)


def _refuse_unsupported(body: dict) -> None:
    for name, defaults in _UNSUPPORTED.items():
        value = body.get(name)
        if not _is_default(value, defaults):
            raise _bad(f"{name}={value!r} is not supported by this server (leave it out)", name,
                       "unsupported_parameter")


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = _get(body, "stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    if any(not s for s in stops):
        raise _bad("stop strings must not be empty", "stop")
    return tuple(stops)


def _stop_ids(body: dict, engine: Engine) -> tuple[int, ...]:
    ids = _get(body, "stop_token_ids", [])
    if not isinstance(ids, list):
        raise _bad(f"stop_token_ids must be a list of token ids, got {ids!r}", "stop_token_ids")
    if len(ids) > engine.config.max_stop_ids:
        raise _bad(f"stop_token_ids has {len(ids)} ids; this server takes at most {engine.config.max_stop_ids}",
                   "stop_token_ids")
    vocab = engine.model.config.vocab_size
    return tuple(_checked("stop_token_ids", validation.integer, t, f"stop_token_ids[{i}]", minimum=0,
                          maximum=vocab - 1) for i, t in enumerate(ids))


def _max_tokens(body: dict) -> tuple[str, int | None]:
    """``max_completion_tokens`` (chat's current name) wins over ``max_tokens``."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            return name, _checked(name, validation.integer, value, name, minimum=1)
    return "max_tokens", None


def _library_param(message: str) -> str | None:
    """The body field a resolve_settings message is about."""
    return next((field for name, field in _LIBRARY_FIELDS.items() if re.search(rf"\b{name}\b", message)), None)


# ---------------------------------------------------------------------- requests


def _settings(body: dict, prompt: list[int], prompt_param: str, engine: Engine, default_max: int | None
              ) -> SlotSettings:
    """The decoding settings of ``body`` for ``prompt`` (``default_max``: the budget when the body
    names none; None = all the context leaves, up to the server's limit)."""
    mode = _get(body, "mode", "ar")
    served = engine.modes
    if mode not in served:
        if mode in SERVED_MODES:
            raise _bad(f"this server does not serve {mode} (nld-serve --quad-block 0); choose one of {served}", "mode")
        raise _bad(f"unknown mode {mode!r}; choose one of {served}", "mode")
    temperature = _get(body, "temperature", 0.0)
    _checked("temperature", validation.number, temperature, "temperature", minimum=0.0, maximum=2.0)
    top_p = _get(body, "top_p", 1.0)
    top_k = _get(body, "top_k", 0)
    block_length = body.get("block_length")
    threshold = body.get("threshold", "auto")
    use_lora = _boolean(body, "use_lora")
    seed = body.get("seed")
    seed = secrets.randbits(63) if seed is None else _checked("seed", validation.seed_value, seed, 1)[0]
    max_name, max_new = _max_tokens(body)
    try:
        s = resolve_settings(engine.model, mode, max_new or 1, block_length, threshold, temperature, use_lora,
                             top_p, top_k)
        limit = engine.block_limit(s.mode)
        if block_length is None and s.block_length > limit:  # the default, on a narrower server
            s = resolve_settings(engine.model, mode, max_new or 1, limit, threshold, temperature, use_lora,
                                 top_p, top_k)
    except ValueError as e:
        raise _bad(str(e), _library_param(str(e))) from None
    if s.block_length > limit:
        flag = "--quad-block" if s.mode == "spec_quadratic" else "--block-width"
        raise _bad(f"block_length {s.block_length} exceeds this server's {s.mode} block width {limit} "
                   f"(nld-serve {flag})", "block_length")
    room = engine.max_len - context_needed(len(prompt), 0, s.mode, s.block_length)
    if max_new is None:
        if room < 1:
            raise _bad(f"the prompt ({len(prompt)} tokens) leaves no room in the server's context of "
                       f"{engine.max_len} positions", prompt_param, "context_length_exceeded")
        max_new = min(room, engine.config.max_new_tokens, default_max or room)
    elif max_new > engine.config.max_new_tokens:
        raise _bad(f"{max_name}={max_new} exceeds this server's limit of {engine.config.max_new_tokens} "
                   "(nld-serve --max-new-tokens)", max_name)
    elif max_new > room:
        try:
            engine.check_fits(len(prompt), max_new, s.mode, s.block_length)
        except ValueError as e:
            raise _bad(str(e), prompt_param, "context_length_exceeded") from None
    return SlotSettings(mode=s.mode, max_new_tokens=max_new, block_length=s.block_length, threshold=s.threshold,
                        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, use_lora=s.use_lora, seed=seed,
                        stop_ids=_stop_ids(body, engine))


def _common(body, engine: Engine, prompt: list[int], prompt_param: str, default_max: int | None) -> Parsed:
    _refuse_unsupported(body)
    stream = _boolean(body, "stream")
    options = _get(body, "stream_options", {})
    if not isinstance(options, dict):
        raise _bad(f"stream_options must be an object, got {options!r}", "stream_options")
    if options and not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = _boolean(options, "include_usage")
    return Parsed(prompt, _settings(body, prompt, prompt_param, engine, default_max), _stop_strings(body), stream,
                  include_usage)


def _check_body(body, model_name: str) -> None:
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {model!r}", "model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def parse_completion(body, engine: Engine, model_name: str) -> Parsed:
    """A ``/v1/completions`` body: ``prompt`` is a string or a list of token ids (one prompt)."""
    _check_body(body, model_name)
    if body.get("prompt") is None:
        raise _bad("prompt is required", "prompt")
    raw = body["prompt"]
    if not isinstance(raw, (str, list)):
        raise _bad(f"prompt must be a string or a list of token ids, got {type(raw).__name__}", "prompt")
    model = engine.model
    rows = _checked("prompt", validation.prompt_ids, raw, vocab=model.config.vocab_size, tokenizer=model.tokenizer,
                    name="prompt")
    if len(rows) != 1:
        raise _bad(f"prompt holds {len(rows)} prompts; this server takes one per request", "prompt")
    return _common(body, engine, rows[0], "prompt", COMPLETION_DEFAULT_MAX_TOKENS)


def parse_chat(body, engine: Engine, model_name: str) -> Parsed:
    """A ``/v1/chat/completions`` body: ``messages`` rendered by the checkpoint's chat template
    (a checkpoint without one gets ``role: content`` lines and a final ``assistant:``)."""
    _check_body(body, model_name)
    tok = engine.model.tokenizer
    if tok is None:
        raise _bad("this checkpoint has no tokenizer: use /v1/completions with token ids", "messages")
    messages = _messages(body.get("messages"))
    try:
        if tok.chat_template:
            ids = tok.apply_chat_template(messages)
        else:
            ids = tok.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")
    except Exception as e:  # a template's raise_exception (e.g. roles that do not alternate)
        raise _bad(f"the chat template refused these messages: {e}", "messages") from None
    rows = _checked("messages", validation.prompt_ids, [ids], vocab=engine.model.config.vocab_size, name="messages")
    return _common(body, engine, rows[0], "messages", None)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts, got "
                       f"{type(content).__name__}", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, request) -> dict:
    """OpenAI's usage plus NLD's ``forwards`` (model forwards, as NVIDIA counts them) and
    ``tokens_per_forward``."""
    n = len(request.tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
            "forwards": request.nfe, "tokens_per_forward": round(n / max(request.nfe, 1), 4)}


def _head(rid: str, obj: str, model_name: str, created: int | None = None) -> dict:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model_name}


def completion_body(rid: str, model_name: str, text: str, finish_reason: str, use: dict) -> dict:
    return {**_head(rid, "text_completion", model_name),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}], "usage": use}


def chat_body(rid: str, model_name: str, text: str, finish_reason: str, use: dict) -> dict:
    return {**_head(rid, "chat.completion", model_name),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": use}


def completion_chunk(rid: str, model_name: str, created: int, text: str | None, finish_reason: str | None = None,
                     use: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {**_head(rid, "text_completion", model_name, created), "choices": choices,
            **({"usage": use} if use is not None else {})}


def chat_chunk(rid: str, model_name: str, created: int, delta: dict | None, finish_reason: str | None = None,
               use: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {**_head(rid, "chat.completion.chunk", model_name, created), "choices": choices,
            **({"usage": use} if use is not None else {})}
