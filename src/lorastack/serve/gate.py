"""The sign-in gate in front of the Gradio UI at ``/ui``.

Gradio's own ``auth`` protects only some of its routes (config and a few more); its API schema, info,
theme, queue and file routes answer anyone. This ASGI middleware lets through only what the browser needs
to show the login page (the page itself, its static assets, and the login form's POST) and requires a
signed-in session (Gradio's session cookie, or trusted ACA Easy Auth headers) for everything else.
Failed sign-ins are throttled per client with the same budget as wrong API keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from .auth import FailureLimiter, client_address

log = logging.getLogger("lorastack.serve")

# What the login page loads before anyone has signed in (paths under /ui). Nothing here reveals the app:
# "/" renders only the login form until Gradio sees a session, and the rest is Gradio's static bundle.
PUBLIC_PATHS = frozenset({"", "/", "/login", "/login/", "/favicon.ico", "/theme.css", "/robots.txt", "/manifest.json"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


def is_public(subpath: str) -> bool:
    """Whether ``subpath`` (the path below /ui) is needed by the browser before sign-in."""
    return subpath in PUBLIC_PATHS or subpath.startswith(PUBLIC_PREFIXES)


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class UIGate:
    """ASGI middleware: everything under ``prefix`` except the public paths needs ``signed_in(scope)``."""

    def __init__(
        self,
        app,
        signed_in: Callable[[dict], bool],
        *,
        prefix: str = "/ui",
        limiter: FailureLimiter | None = None,
        proxy_hops: int = 0,
        enabled: Callable[[], bool] = lambda: True,
    ):
        self.app, self.signed_in, self.prefix = app, signed_in, prefix
        self.limiter, self.proxy_hops, self.enabled = limiter, proxy_hops, enabled

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not self.enabled():
            return await self.app(scope, receive, send)
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            return await self.app(scope, receive, send)
        sub = path[len(self.prefix) :]
        if sub in ("/login", "/login/") and scope.get("method") == "POST" and self.limiter is not None:
            return await self._login(scope, receive, send)
        if is_public(sub):
            return await self.app(scope, receive, send)
        if self.signed_in(scope):
            if sub.startswith(_NAMED_CALLS):
                # Gradio's programmatic call routes (gradio_client's, not the browser's, which uses the
                # queue) answer unknown names and odd bodies with 500s; the API for programs is /v1.
                await _send_json(send, 404, {"detail": "The UI has no programmatic API here; use /v1."})
                return
            return await self._guarded(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _send_json(send, 401, {"detail": {"error": "Not authenticated", "auth_message": "Sign in at /ui/."}})

    async def _guarded(self, scope, receive, send):
        """Run Gradio; a malformed request it fails on (e.g. a /run/predict body that names no function)
        is a 400 and one log line, not a 500 with a traceback. Gradio's own error middleware answers 500
        and then re-raises, so a 500 response is held back until we know whether an exception follows."""
        held: list[dict] = []
        state = {"started": False}

        async def watch(message):
            if message["type"] == "http.response.start" and message.get("status") == 500:
                held.append(message)
                return
            if held:
                held.append(message)
                return
            if message["type"] in ("http.response.start", "websocket.accept"):
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if state["started"] or scope["type"] != "http":
                raise
            log.warning("UI request %s %s refused: %s: %s", scope.get("method"), scope.get("path", "")[:200],
                        type(exc).__name__, str(exc)[:200])
            await _send_json(send, 400, {"detail": f"Bad request to the UI: {type(exc).__name__}"})
            return
        for message in held:  # a 500 without an exception: pass it on as it was
            await send(message)

    async def _login(self, scope, receive, send):
        client = client_address(scope, self.proxy_hops)
        wait = self.limiter.retry_after(client)
        if wait is not None:
            await _send_json(
                send,
                429,
                {"detail": f"Too many failed sign-ins from your address; retry after {wait} s."},
                {"Retry-After": str(wait)},
            )
            return
        status: list[int] = []

        async def watch(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] >= 400:
            self.limiter.failed(client)


# Gradio's named-call routes for programs (gradio_client); the browser uses the queue and /run/predict.
_NAMED_CALLS = ("/gradio_api/call/", "/gradio_api/api/")


def gradio_session_check(gradio_app) -> Callable[[dict], bool]:
    """``signed_in(scope)`` for Gradio's login: the request's session cookie names a live Gradio token."""
    from starlette.requests import HTTPConnection

    def signed_in(scope) -> bool:
        cookies = HTTPConnection(scope).cookies
        cid = gradio_app.cookie_id
        token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
        return bool(token) and token in gradio_app.tokens

    return signed_in
