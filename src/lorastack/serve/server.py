"""The app factory (``create_app``), ``run_server``, and the ``lorastack serve`` command.

``create_app`` builds the FastAPI app: ``/v1`` (OpenAI-compatible, Bearer keys), ``/healthz`` and
``/readyz`` (open, for the probes) and the Gradio UI at ``/ui`` (login with any user name and an API key
as password, or ACA Easy Auth headers when ``trust_easy_auth``). The base model loads in a background
thread at startup so the liveness probe answers at once; ``/readyz`` turns 200 when it is loaded.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorastack.store import Store, open_store

from .api import APIError, build_router
from .auth import easy_auth_user, generate_key, is_loopback, key_matches, keys_from_env

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
            # The event loop renders prompts while the engine thread decodes replies: each gets its own
            # copy of the (Rust) fast tokenizer, which is not meant to be shared across threads.
            self.tokenizer = copy.deepcopy(tokenizer)
            self.max_context = context_length(model, tokenizer)
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

    def model_cards(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: the base model, then every adapter for it (``parent`` = the base)."""
        cards = [
            {
                "id": self.base_model_id,
                "object": "model",
                "created": self.started,
                "owned_by": "lorastack",
                "root": self.base_model_id,
                "parent": None,
            }
        ]
        if self.registry is None:
            return cards
        for ad in self.registry.list_adapters():
            if not ad["compatible"]:
                continue
            cards.append(
                {
                    "id": ad["name"],
                    "object": "model",
                    "created": ad["created"],
                    "owned_by": "lorastack",
                    "root": ad["ref"],
                    "parent": self.base_model_id,
                    "version": ad["version"],
                }
            )
        return cards


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
        if request.url.path.startswith("/v1"):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "Internal server error; see the server log.", type="server_error", code="internal_error").response()

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        if state.engine is None:
            body = {"status": "failed" if state.load_error else "loading", "error": state.load_error}
            return JSONResponse(body, status_code=503)
        return {
            "status": "ready",
            "base_model": state.base_model_id,
            **state.info,
            "adapters_loaded": state.registry.loaded,
            "queue_depth": state.engine.queue_depth,
            "running": state.engine.running,
        }

    app.include_router(build_router())

    if ui:
        import gradio as gr

        from .ui import build_ui

        kwargs: dict[str, Any] = {}
        if state.api_keys and state.trust_easy_auth:
            kwargs["auth_dependency"] = lambda request: easy_auth_user(request.headers)
        elif state.api_keys:
            kwargs["auth"] = lambda _user, password: key_matches(password or "", state.api_keys)
            kwargs["auth_message"] = "Sign in with any user name and an API key as the password."
        gr.mount_gradio_app(app, build_ui(state), path="/ui", ssr_mode=False, footer_links=[], **kwargs)

        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse("/ui/")

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def infer_base_model(store: Store) -> str:
    """The base model the store's adapters were trained on; raises ValueError if none or ambiguous."""
    bases = sorted({ad.base_model for ad in store.adapters() if ad.base_model})
    if not bases:
        raise ValueError(f"no adapters in the store at {store.root}: pass --base-model to serve a base model")
    if len(bases) > 1:
        raise ValueError(
            f"the adapters in {store.root} use several base models ({', '.join(bases)}): pass --base-model "
            "to choose one (adapters for the others are refused)"
        )
    return bases[0]


def serve_command(args) -> int:
    """``lorastack serve``: serve the store's adapters with the OpenAI API and the chat UI."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(args.store)
    if args.local:
        store.init()
    elif not store.root.is_dir():
        print(f"lorastack serve: the store {store.root} does not exist (pass --store or mount it)", file=sys.stderr)
        return 2
    keys = keys_from_env()
    generated = None
    if args.no_auth:
        if not is_loopback(args.host):
            print(
                f"lorastack serve: --no-auth is allowed only on a loopback address (127.0.0.1, ::1, localhost), "
                f"not {args.host!r}; set LORASTACK_API_KEYS instead",
                file=sys.stderr,
            )
            return 2
        keys = []
    elif not keys:
        if not args.local:
            print(
                "lorastack serve: no API keys: set LORASTACK_API_KEYS (comma-separated; a Key Vault secret in "
                "Azure), or run with --local to generate one",
                file=sys.stderr,
            )
            return 2
        generated = generate_key()
        keys = [generated]
    try:
        base = args.base_model or infer_base_model(store)
        from .vllm_engine import choose_engine  # --engine, else $LORASTACK_ENGINE, else builtin

        engine = choose_engine(getattr(args, "engine", None))
    except ValueError as exc:
        print(f"lorastack serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        store,
        base,
        keys,
        base_revision=getattr(args, "base_revision", None),
        quantize=not getattr(args, "no_4bit", False),
        max_batch_size=getattr(args, "max_batch_size", 16),
        max_queue=getattr(args, "max_queue", 64),
        max_loaded_adapters=getattr(args, "max_loaded_adapters", 8),
        trust_easy_auth=getattr(args, "trust_easy_auth", False),
        engine=engine,
    )
    url = f"http://{'localhost' if is_loopback(args.host) else args.host}:{args.port}"
    print(f"serving {base} and its adapters from {store.root}")
    print(f"  OpenAI API: {url}/v1   chat UI: {url}/ui   health: {url}/healthz, {url}/readyz")
    if generated:
        # The one time a key is ever shown: it exists only in this process.
        print(f"  API key (generated for this run, shown once): {generated}")
        print("  UI login: any user name, the API key as password")
    elif not keys:
        print("  auth disabled (--no-auth, loopback only)")
    sys.stdout.flush()
    run_server(app, args.host, args.port)
    return 0
