"""Who may call the server: Bearer API keys on ``/v1``; a login or ACA Easy Auth headers on the UI.

Keys come from ``LORASTACK_API_KEYS`` (comma-separated; in Azure Container Apps a Key Vault secret
reference). They are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets

API_KEYS_ENV = "LORASTACK_API_KEYS"
# Set by Azure Container Apps Easy Auth after it has authenticated the caller at the platform edge.
EASY_AUTH_HEADER = "x-ms-client-principal-name"


def keys_from_env(env: dict[str, str] | None = None) -> list[str]:
    """The API keys in ``$LORASTACK_API_KEYS`` (comma-separated, blanks ignored)."""
    raw = (env if env is not None else os.environ).get(API_KEYS_ENV, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def generate_key() -> str:
    """A new random API key (for ``lorastack serve --local``)."""
    return "ls-" + secrets.token_urlsafe(32)


def key_matches(candidate: str, keys: list[str]) -> bool:
    """Constant-time check of ``candidate`` against every key (no early exit on the first match)."""
    ok = False
    cand = candidate.encode()
    for key in keys:
        ok |= hmac.compare_digest(cand, key.encode())
    return ok


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def easy_auth_user(headers) -> str | None:
    """The signed-in user's name from ACA Easy Auth headers, or None.

    Only trust this when Easy Auth is enabled on the app (``--trust-easy-auth``): otherwise anyone could
    send the header themselves.
    """
    name = headers.get(EASY_AUTH_HEADER)
    return name.strip() if name and name.strip() else None


# -- key strength ---------------------------------------------------------------------------------

MIN_KEY_LENGTH = 16
MIN_KEY_DISTINCT = 8  # "aaaaaaaaaaaaaaaa" or "1234123412341234" are long but guessable


def weak_key_problems(keys: list[str]) -> list[str]:
    """Why each key below the minimum strength is refused (keys are named by position, never shown)."""
    problems = []
    for i, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_LENGTH:
            problems.append(f"key #{i} has {len(key)} characters; at least {MIN_KEY_LENGTH} are required")
        elif len(set(key)) < MIN_KEY_DISTINCT:
            problems.append(f"key #{i} uses only {len(set(key))} distinct characters; at least {MIN_KEY_DISTINCT} are required")
        elif any(c.isspace() or not c.isprintable() for c in key):
            problems.append(f"key #{i} contains whitespace or control characters")
    return problems


# -- throttling failed attempts ---------------------------------------------------------------------


def client_address(scope, proxy_hops: int = 0) -> str:
    """Who is calling, for throttling: the socket peer, or with ``proxy_hops`` trusted proxies in front
    (ACA's ingress is one), the address the outermost trusted proxy saw (counted from the right of
    ``X-Forwarded-For``, so a client cannot pick its own bucket by sending the header itself)."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if proxy_hops <= 0:
        return str(peer)
    forwarded = []
    for name, value in scope.get("headers") or []:
        if name == b"x-forwarded-for":
            forwarded.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
    if len(forwarded) >= proxy_hops:
        return forwarded[-proxy_hops]
    return forwarded[0] if forwarded else str(peer)


class FailureLimiter:
    """Per-client budget of failed authentications: ``max_failures`` within ``window`` seconds, after
    which the client is refused (429 + Retry-After) until its oldest failure leaves the window. Bounded
    memory: at most ``max_clients`` clients are tracked (the stalest are dropped)."""

    def __init__(self, max_failures: int = 10, window: float = 60.0, max_clients: int = 10_000, clock=None):
        import threading
        import time

        self.max_failures, self.window, self.max_clients = max_failures, window, max_clients
        self._clock = clock or time.monotonic
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, ()) if now - t < self.window]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None if it is not throttled."""
        import math

        with self._lock:
            now = self._clock()
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return None
            return max(1, math.ceil(self.window - (now - times[-self.max_failures])))

    def failed(self, client: str) -> None:
        """Record one failed attempt by ``client``."""
        with self._lock:
            now = self._clock()
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times[-self.max_failures :]
            if len(self._failures) > self.max_clients:
                stalest = min(self._failures, key=lambda c: self._failures[c][-1])
                self._failures.pop(stalest, None)


# -- access log -------------------------------------------------------------------------------------


class ScrubQueryStrings:
    """A ``logging.Filter`` for uvicorn's access log: drops every query string from the logged path, so a
    key someone put in a URL (``?api_key=...``) never reaches the log. Keys are only ever read from the
    ``Authorization`` header."""

    def filter(self, record) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query removed]", *args[3:])
        return True


def install_access_log_scrubber() -> None:
    """Attach :class:`ScrubQueryStrings` to uvicorn's access logger (idempotent)."""
    import logging

    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ScrubQueryStrings) for f in logger.filters):
        logger.addFilter(ScrubQueryStrings())
