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
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from .auth import bearer_token, key_matches
from .engine import AsyncSink, EngineNotReady, Event, GenerationRequest, QueueFull, SamplingParams
from .registry import AdapterInvalid, ModelNotFound

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


def _from_validation(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or None
    msg = err.get("msg", "invalid value")
    where = f"'{param}'" if param else "the request body"
    extra = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return APIError(400, f"Invalid value for {where}: {msg}{extra}", param=param, code="invalid_value")


# -- schemas ---------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation (text content; parts of type ``text`` are joined)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            bad = [p.type for p in v if p.type != "text" or p.text is None]
            if bad:
                raise ValueError(f"only text content parts are supported, got {bad[0]!r}")
        return v

    def for_template(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that this server honours."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only n=1 is supported")
    # Accepted only at their "off" values: silently ignoring them would mislead the client.
    tools: list[Any] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The name of a requested feature this server does not implement, if any."""
        if self.tools:
            return "tools"
        if self.logprobs:
            return "logprobs"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v == "":
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- helpers ---------------------------------------------------------------------------------------


def render_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids for the whole conversation, with the base model's chat template."""
    from lorastack.chat import render_prompt  # the same rendering the trainer uses

    return render_prompt(tokenizer, messages)


async def read_json_body(request: Request, limit: int) -> Any:
    """The request's JSON body; 413 over ``limit`` bytes, 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is {declared} bytes; the limit is {limit} bytes.", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise APIError(413, f"Request body is over the limit of {limit} bytes.", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object.",
            code="invalid_json",
        ) from None


def require_api_key(request: Request) -> None:
    """FastAPI dependency: a valid ``Authorization: Bearer <key>`` unless auth is disabled."""
    keys = request.app.state.lorastack.api_keys
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
    if not key_matches(token, keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


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
    try:
        resolved = await run_in_threadpool(reg.acquire, model)
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
            prompt = render_messages(state.tokenizer, messages)
        except ValueError as exc:  # the chat template refused the conversation (e.g. role order)
            raise APIError(400, f"The conversation cannot be rendered: {exc}", param="messages", code="invalid_messages") from None
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
        feature = req.unsupported()
        if feature:
            raise APIError(400, f"'{feature}' is not supported by this server.", param=feature, code="unsupported_parameter")
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
