"""The app factory (``create_app``), ``run_server``, and the ``lorastack serve`` command.

``create_app`` builds the FastAPI app: ``/v1`` (OpenAI-compatible, Bearer keys), ``/healthz`` and
``/readyz`` (open, for the probes; ``/readyz`` says only ready or not unless the caller sends a valid key)
and the Gradio UI at ``/ui`` (login with any user name and an API key as password, or ACA Easy Auth
headers when ``trust_easy_auth``; every UI route but the login page's is behind that sign-in). The base
model loads in a background thread at startup so the liveness probe answers at once; ``/readyz`` turns
200 when it is loaded. Whatever the store holds, the server starts and serves the base model: an adapter
that cannot be served is logged, left out of ``/v1/models`` and refused by name when requested.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.routing import Mount

from lorastack.store import Store

from .api import APIError, build_router, has_valid_key
from .auth import FailureLimiter, easy_auth_user, install_access_log_scrubber, key_matches

log = logging.getLogger("lorastack.serve")


class ServerState:
    """Everything the routes share: settings, and (once loaded) the model, registry and engine."""

    def __init__(
        self,
        store: Store,
        base_model: str,
        api_keys: list[str],
        *,
        base_revision: str | None = None,
        quantize: bool = True,
        max_batch_size: int = 16,
        max_queue: int = 64,
        max_loaded_adapters: int = 8,
        max_body_bytes: int = 4 << 20,
        trust_easy_auth: bool = False,
        engine: str = "builtin",
        proxy_hops: int = 0,
        max_auth_failures: int = 10,
        auth_failure_window: float = 60.0,
        render_timeout: float = 10.0,
    ):
        self.engine_kind = engine  # "builtin" | "vllm" (serve/vllm_engine.py)
        self.store = store
        self.base_model_id = base_model
        self.api_keys = list(api_keys)
        self.base_revision = base_revision
        self.quantize = quantize
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_loaded_adapters = max_loaded_adapters
        self.max_body_bytes = max_body_bytes
        self.trust_easy_auth = trust_easy_auth
        self.proxy_hops = proxy_hops
        self.auth_limiter = FailureLimiter(max_auth_failures, auth_failure_window)  # wrong keys and sign-ins
        self.render_timeout = render_timeout
        self.renderer = None
        self.engine = None
        self.registry = None
        self.tokenizer = None
        self.max_context = 0
        self.info: dict[str, Any] = {}
        self.load_error: str | None = None
        self.started = int(time.time())

    def load(self) -> None:
        """Load the base model and start the engine (idempotent; records a failure for /readyz)."""
        if self.engine is not None:
            return
        if self.engine_kind == "vllm":  # vLLM behind the same API, auth and UI
            from .vllm_engine import load_vllm

            return load_vllm(self)
        try:
            from lorastack.models import hub_cache_dir

            from .engine import Engine, context_length, eos_token_ids, load_base_model
            from .registry import AdapterRegistry

            t0 = time.monotonic()
            model, tokenizer, info = load_base_model(
                self.base_model_id,
                cache_dir=hub_cache_dir(self.store.models_dir),  # the same cache the trainer filled
                revision=self.base_revision,
                quantize=self.quantize,
            )
            eos = eos_token_ids(model, tokenizer)
            from lorastack.chat import end_of_turn_ids

            try:  # the template's end-of-turn token stops generation even if generation_config lacks it
                eos |= set(end_of_turn_ids(tokenizer))
            except ValueError as exc:  # no usable template: keep the generation config's eos ids
                log.info("no end-of-turn tokens from the chat template (%s)", exc)
            registry = AdapterRegistry(
                self.store,
                self.base_model_id,
                model,
                base_revision=self.base_revision or info.get("revision"),
                max_loaded=self.max_loaded_adapters,
            )
            # Render workers tokenize prompts while the engine thread decodes replies: each gets its own
            # copy of the (Rust) fast tokenizer, which is not meant to be shared across threads.
            from .prompts import PromptRenderer

            self.tokenizer = copy.deepcopy(tokenizer)
            self.max_context = context_length(model, tokenizer)
            # as many prompts may wait for rendering as requests may wait for the engine (plus a batch)
            self.renderer = PromptRenderer(
                self.tokenizer,
                self.max_context,
                timeout=self.render_timeout,
                max_waiting=max(16, self.max_queue + self.max_batch_size),
            )
            self.info = info
            self.registry = registry
            self.engine = Engine(
                registry.get_model,
                tokenizer,
                eos_ids=eos,
                max_context=self.max_context,
                model_lock=registry.model_lock,
                max_batch_size=self.max_batch_size,
                max_queue=self.max_queue,
            ).start()
            registry.on_model_change = self.engine.model_changed
            log.info(
                "base model %s loaded in %.1f s (%s, %s%s)",
                self.base_model_id,
                time.monotonic() - t0,
                info["device"],
                info["dtype"],
                ", 4-bit NF4" if info["quantized"] else "",
            )
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the base model %s failed", self.base_model_id)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.renderer is not None:
            self.renderer.close()

    def _base_card(self) -> dict[str, Any]:
        return {
            "id": self.base_model_id,
            "object": "model",
            "created": self.started,
            "owned_by": "lorastack",
            "root": self.base_model_id,
            "parent": None,
        }

    def model_cards(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: the base model, then for every adapter made for it ``name`` (the version
        LATEST names) and each verified ``name@vN``; ``promoted`` marks the version LATEST names and
        ``root`` is the version that answers. Adapters that cannot be served are left out (and logged)."""
        cards = [self._base_card()]
        if self.registry is None:
            return cards
        servable, _ = self.registry.catalog()
        for ad in servable:
            cards.append(
                {
                    "id": ad["id"],
                    "object": "model",
                    "created": ad["created"],
                    "owned_by": "lorastack",
                    "root": ad["ref"],
                    "parent": self.base_model_id,
                    "version": ad["version"],
                    "promoted": ad["promoted"],
                }
            )
        return cards

    def unavailable(self) -> list[dict[str, str]]:
        """Adapters (or versions) that cannot be served, each with the reason (no absolute paths)."""
        if self.registry is None:
            return []
        return self.registry.catalog()[1]


def create_app(
    store: Store | str | Path,
    base_model: str,
    api_keys: list[str] | None,
    *,
    ui: bool = True,
    load_in_background: bool = True,
    **settings: Any,
) -> FastAPI:
    """The FastAPI app serving ``base_model`` and every adapter for it in ``store``.

    ``api_keys``: Bearer keys for ``/v1`` and the UI login; an empty list disables auth (the caller
    decides whether that is allowed). ``settings`` go to ``ServerState`` (quantize, max_batch_size,
    max_queue, max_loaded_adapters, max_body_bytes, base_revision, trust_easy_auth).
    """
    store = store if isinstance(store, Store) else Store(store)
    state = ServerState(store, base_model, api_keys or [], **settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        install_access_log_scrubber()  # after uvicorn has configured its loggers
        if load_in_background:
            threading.Thread(target=state.load, name="lorastack-load", daemon=True).start()
        else:
            state.load()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="lorastack inference", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.lorastack = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return APIError(400, f"Invalid request: {exc.errors()[0].get('msg', 'invalid value')}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # Every path outside the UI answers in OpenAI's shape, unknown routes and methods included.
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        path = request.url.path[:200]
        if status == 404:
            message = f"Invalid URL ({request.method} {path}): no such route; the API is under /v1."
        elif status == 405:
            message = f"Method {request.method} is not allowed on {path}."
        else:
            message = f"{request.method} {path}: {exc.detail}"
        kind = "invalid_request_error" if status < 500 else "server_error"
        return APIError(status, message, type=kind, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "Internal server error; see the server log.", type="server_error", code="internal_error").response()

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request):
        # Anonymous callers (the probes) learn ready or not; the details need a key.
        detailed = has_valid_key(request)
        if state.engine is None:
            body: dict[str, Any] = {"status": "failed" if state.load_error else "loading"}
            if detailed:
                body["error"] = state.load_error
            return JSONResponse(body, status_code=503)
        if not detailed:
            return {"status": "ready"}
        unavailable = await run_in_threadpool(state.unavailable)
        return {
            "status": "ready",
            "base_model": state.base_model_id,
            **state.info,
            "adapters_loaded": state.registry.loaded,
            "adapters_unavailable": unavailable,
            "queue_depth": state.engine.queue_depth,
            "running": state.engine.running,
        }

    app.include_router(build_router())

    if ui:
        import gradio as gr

        from .gate import UIGate, gradio_session_check
        from .ui import build_ui

        kwargs: dict[str, Any] = {}
        if state.api_keys and state.trust_easy_auth:
            kwargs["auth_dependency"] = lambda request: easy_auth_user(request.headers)
        elif state.api_keys:
            kwargs["auth"] = lambda _user, password: key_matches(password or "", state.api_keys)
            kwargs["auth_message"] = "Sign in with any user name and an API key as the password."
        gr.mount_gradio_app(app, build_ui(state), path="/ui", ssr_mode=False, footer_links=[], **kwargs)
        gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == "/ui")
        if not state.api_keys:
            signed_in = lambda scope: True  # --no-auth (loopback only)
        elif state.trust_easy_auth:
            signed_in = lambda scope: easy_auth_user(HTTPConnection(scope).headers) is not None
        else:
            signed_in = gradio_session_check(gradio_app)
        app.add_middleware(
            UIGate,
            signed_in=signed_in,
            prefix="/ui",
            limiter=state.auth_limiter if state.api_keys and not state.trust_easy_auth else None,
            proxy_hops=state.proxy_hops,
        )

        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse("/ui/")

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    install_access_log_scrubber()  # no query string (where a careless client may put a key) in the access log
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
