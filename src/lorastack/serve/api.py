"""The OpenAI-compatible ``/v1`` API: request/response schemas, routes, and errors in OpenAI's shape.

Wire format (checked with the official ``openai`` client): a non-streaming ``chat.completion``; or
server-sent ``chat.completion.chunk`` events whose first delta carries the role, whose last choice chunk
carries ``finish_reason``, optionally followed by a usage chunk (``stream_options.include_usage``), and
then ``data: [DONE]``. Every error is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from .auth import bearer_token, client_address, key_matches
from .engine import AsyncSink, EngineNotReady, Event, GenerationRequest, QueueFull, SamplingParams
from .prompts import PromptRefused
from .registry import AdapterInvalid, BadModelRef, ModelNotFound

log = logging.getLogger("lorastack.serve")


# -- errors ----------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _loc_param(loc) -> str | None:
    """``messages.0.content`` from a pydantic error location, without pydantic's union-member tags."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, str) and ("[" in p or p in _UNION_TAGS or p[:1].isupper() or p.startswith("function-")):
            continue
        parts.append(str(p))
    return ".".join(parts) or None


def _from_validation(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False, include_input=False)
    err = errors[0]
    param = _loc_param(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    msg = err.get("msg", "invalid value")
    where = f"'{param}'" if param else "the request body"
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"Invalid value for {where}: {msg}{extra}", param=param, code="invalid_value")


# -- schemas ---------------------------------------------------------------------------------------
# Strict at the edge: no coercion ("yes" is not a bool, true is not 1, "0.5" is not a number), no unknown
# fields (OpenAI refuses those too), and OpenAI's documented ranges. What this server does not implement
# is refused with a 400 naming it, never silently ignored.

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NESTING = 32  # the deepest a valid request goes is ~5 (messages -> content parts -> ...)
MAX_STOP_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    """One message of the conversation (text content; parts of type ``text`` are joined)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    # What the openai client echoes back from an earlier response: accepted only empty.
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            bad = [p.type for p in v if p.type != "text" or p.text is None]
            if bad:
                raise ValueError(f"only text content parts are supported, got {bad[0]!r}")
        return v

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tool calls and audio are not supported by this server")
        return v

    def for_template(self) -> dict[str, str]:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text or "" for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ResponseFormat(_Strict):
    type: str


Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class ChatCompletionRequest(_Strict):
    """OpenAI's chat-completions request: what this server honours, plus the parameters it accepts only at
    their "off" values (see ``unsupported``)."""

    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: Probability | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    # accepted only at their "off" values
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, int | float] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # bookkeeping fields with no effect on the answer
    user: str | None = Field(default=None, max_length=512)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, why) for a requested feature this server does not implement, if any."""
        if self.tools is not None:
            return "tools", "tool calling is not supported by this server; remove 'tools'"
        if self.functions is not None:
            return "functions", "function calling is not supported by this server; remove 'functions'"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"'{name}' needs tool calling, which this server does not support"
        if self.logprobs:
            return "logprobs", "'logprobs' is not supported by this server"
        if self.top_logprobs:
            return "top_logprobs", "'top_logprobs' is not supported by this server"
        if self.n not in (None, 1):
            return "n", "only n=1 is supported"
        if self.response_format is not None and self.response_format.type != "text":
            kind = self.response_format.type
            if kind in ("json_object", "json_schema"):
                return "response_format", f"response_format type {kind!r} is not supported; only 'text'"
            return "response_format", f"unknown response_format type {kind!r}; the supported type is 'text'"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"'{name}' is not supported by this server (only 0)"
        if self.logit_bias:
            return "logit_bias", "'logit_bias' is not supported by this server"
        if self.modalities is not None and self.modalities != ["text"]:
            return "modalities", "only the 'text' modality is supported"
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                return name, f"'{name}' is not supported by this server"
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        items = v if isinstance(v, list) else [v] if v is not None else []
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- helpers ---------------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(body: bytes) -> Any:
    """Parse a request body strictly; a 400 ``invalid_json`` for anything JSON-adjacent that would
    break later: bad UTF-8, NaN/Infinity, integers over Python's 4300-digit limit, nesting deeper than
    MAX_NESTING, and lone UTF-16 surrogates (which cannot be encoded to UTF-8 again)."""

    def bad(why: str) -> APIError:
        return APIError(400, f"We could not parse the JSON body of your request: {why}.", code="invalid_json")

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"it is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise bad(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise bad(f"it is nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:  # NaN/Infinity, or an integer literal too long to convert
        raise bad(str(exc).split(";")[0][:200]) from None
    # one iterative walk: depth and strings (keys included)
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, str):
            _check_text(obj, bad)
        elif isinstance(obj, (dict, list)):
            if depth > MAX_NESTING:
                raise bad(f"it is nested more than {MAX_NESTING} levels deep")
            if isinstance(obj, dict):
                for k, v in obj.items():
                    _check_text(k, bad)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in obj)
    return data


def _check_text(s: str, bad) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"a string holds a lone UTF-16 surrogate (\\u{ord(s[exc.start]):04x}) at position {exc.start}") from None


async def read_json_body(request: Request, limit: int) -> Any:
    """The request's JSON body; 413 over ``limit`` bytes, 400 if it is not strict JSON (see parse_json_body)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is {declared} bytes; the limit is {limit} bytes.", code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise APIError(413, f"Request body is over the limit of {limit} bytes.", code="request_too_large")
    except ClientDisconnect:
        raise APIError(400, "The client disconnected while sending the request.", code="client_disconnected") from None
    return parse_json_body(bytes(body))


def throttled(retry_after: int) -> APIError:
    return APIError(
        429,
        f"Too many failed authentication attempts from your address; retry after {retry_after} s.",
        type="rate_limit_error",
        code="too_many_failed_attempts",
        headers={"Retry-After": str(retry_after)},
    )


def require_api_key(request: Request) -> None:
    """FastAPI dependency: a valid ``Authorization: Bearer <key>`` unless auth is disabled.

    Keys are read from that header only (never the query string). Wrong keys count against the client's
    failure budget; once it is spent, the client gets 429 + Retry-After before any key is checked.
    """
    state = request.app.state.lorastack
    keys = state.api_keys
    if not keys:
        return
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    client = client_address(request.scope, state.proxy_hops)
    wait = state.auth_limiter.retry_after(client)
    if wait is not None:
        raise throttled(wait)
    if not key_matches(token, keys):
        state.auth_limiter.failed(client)
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def has_valid_key(request: Request) -> bool:
    """Whether the request carries a valid key (for optional detail, e.g. ``/readyz``); never throttles."""
    keys = request.app.state.lorastack.api_keys
    token = bearer_token(request.headers.get("authorization"))
    return not keys or (token is not None and key_matches(token, keys))


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None, usage_field: bool) -> str:
    obj: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage_field:
        obj["usage"] = None
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(ev: Event) -> dict[str, int]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


# -- admission (shared by the API and the UI) ------------------------------------------------------


async def start_generation(
    state, model: str, messages: list[dict[str, str]], params: SamplingParams, max_tokens: int | None
) -> tuple[GenerationRequest, AsyncSink, str]:
    """Resolve ``model``, render the prompt, and queue the generation. Returns (request, sink, served id).

    Raises APIError for anything the caller can fix (unknown model, prompt too long, queue full).
    """
    if state.engine is None:
        raise APIError(
            503,
            "The model is still loading; retry shortly." if state.load_error is None else "The model failed to load.",
            type="server_error",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )
    reg = state.registry
    size = state.renderer.too_large(messages)  # refuse before loading anything for a hopeless prompt
    if size is not None:
        raise APIError(
            400,
            f"This model's maximum context length is {state.max_context} tokens. However, your messages are "
            f"{size} bytes long, which is more than that many tokens. Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    try:
        resolved = await run_in_threadpool(reg.acquire, model)
    except BadModelRef as exc:
        raise APIError(400, str(exc), param="model", code="invalid_model") from None
    except ModelNotFound as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    except AdapterInvalid as exc:
        raise APIError(422, str(exc), param="model", code="adapter_invalid") from None
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            reg.release(resolved.slot)

    try:
        try:
            prompt = await state.renderer.render(messages)  # off the event loop, bounded in time
        except PromptRefused as exc:
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
            raise APIError(exc.status, str(exc), type=kind, param="messages", code=exc.code, headers=headers) from None
        room = state.max_context - len(prompt)
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {state.max_context} tokens. However, your messages "
                f"resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        params.max_tokens = min(max_tokens or room, room)
        sink = AsyncSink()
        greq = GenerationRequest(prompt, resolved.slot, params, sink, on_finish=release)
        try:
            state.engine.submit(greq)
        except QueueFull as exc:
            raise APIError(
                429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except EngineNotReady as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
    except BaseException:
        release()
        raise
    return greq, sink, resolved.served


# -- routes ----------------------------------------------------------------------------------------


def build_router() -> APIRouter:
    """The ``/v1`` routes (mounted with the API-key dependency)."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @router.get("/models")
    async def list_models(request: Request):
        state = request.app.state.lorastack
        return {"object": "list", "data": await run_in_threadpool(state.model_cards)}

    @router.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request):
        state = request.app.state.lorastack
        for card in await run_in_threadpool(state.model_cards):
            if card["id"] == model_id:
                return card
        raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.", param="model", code="model_not_found")

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        state = request.app.state.lorastack
        data = await read_json_body(request, state.max_body_bytes)
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise _from_validation(exc) from None
        refused = req.unsupported()
        if refused:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is true.", param="stream_options")
        params = SamplingParams(
            max_tokens=0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
        )
        messages = [m.for_template() for m in req.messages]
        greq, sink, served = await start_generation(
            state, req.model, messages, params, req.max_completion_tokens or req.max_tokens
        )
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(greq, sink, cid, created, served, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, greq, sink, cid, created, served)

    return router


async def _complete(request: Request, greq: GenerationRequest, sink: AsyncSink, cid, created, served):
    parts: list[str] = []
    checked = time.monotonic()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(sink.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - checked >= 0.5:  # tokens keep coming, so check on a clock
                checked = time.monotonic()
                if await request.is_disconnected():  # nobody will read the answer: stop generating
                    greq.cancel()
                    return JSONResponse({}, status_code=499)
            if ev is None:
                continue
            if ev.kind == "delta":
                parts.append(ev.text)
            elif ev.kind == "error":
                raise APIError(500, "The server failed while generating; see its log.", type="server_error", code="internal_error")
            else:
                break
    finally:
        if not greq.finished:
            greq.cancel()
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": served,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                "logprobs": None,
                "finish_reason": ev.finish_reason,
            }
        ],
        "usage": _usage(ev),
    }


async def _stream(greq: GenerationRequest, sink: AsyncSink, cid, created, served, include_usage: bool):
    try:
        yield _chunk(cid, created, served, {"role": "assistant", "content": ""}, None, include_usage)
        while True:
            ev = await sink.queue.get()
            if ev.kind == "delta":
                yield _chunk(cid, created, served, {"content": ev.text}, None, include_usage)
            elif ev.kind == "error":
                err = APIError(500, "The server failed while generating; see its log.", type="server_error", code="internal_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            else:
                yield _chunk(cid, created, served, {}, ev.finish_reason, include_usage)
                if include_usage:
                    obj = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": served,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": _usage(ev),
                    }
                    yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        # the client went away (the response task is cancelled) or we are done: stop the generation
        if not greq.finished:
            greq.cancel()
