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
