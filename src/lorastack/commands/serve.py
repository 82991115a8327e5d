"""``lorastack serve``: settings from flags and environment, checks, then the inference app."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter

from lorastack.store import Store, open_store

# The same literal names provisioning sets on the inference app (provisioning/contract.py).
ENV_BASE_MODEL = "LORASTACK_BASE_MODEL"
ENV_BASE_REVISION = "LORASTACK_BASE_REVISION"
ENV_PROXY_HOPS = "LORASTACK_PROXY_HOPS"  # provisioning/contract.py sets it on the app

log = logging.getLogger("lorastack.serve")


def infer_base_model(store: Store) -> str | None:
    """The base model of the store's adapters when none is configured: the one most adapters name (ties:
    the most recently published). None for an empty store. Unreadable adapters are skipped."""
    counts: Counter[str] = Counter()
    newest: dict[str, str] = {}
    for ad in store.adapters():
        if ad.base_model:
            counts[ad.base_model] += 1
            newest[ad.base_model] = max(newest.get(ad.base_model, ""), str(ad.manifest.get("published_at") or ""))
    if not counts:
        return None
    best = max(counts, key=lambda b: (counts[b], newest[b]))
    if len(counts) > 1:
        others = ", ".join(sorted(b for b in counts if b != best))
        log.warning("the store's adapters use several base models; serving %s (pass --base-model or set %s to "
                    "choose; adapters for %s are not served)", best, ENV_BASE_MODEL, others)
    return best


def serve_command(args: argparse.Namespace) -> int:
    """``lorastack serve``: serve the base model and the store's adapters (OpenAI API + chat UI)."""
    from lorastack.serve.auth import generate_key, is_loopback, keys_from_env, weak_key_problems
    from lorastack.serve.server import create_app, run_server

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
    problems = weak_key_problems(keys)
    if problems:
        print(
            "lorastack serve: LORASTACK_API_KEYS holds keys too weak to expose: " + "; ".join(problems)
            + ". Use random keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
            file=sys.stderr,
        )
        return 2
    base = args.base_model or os.environ.get(ENV_BASE_MODEL) or infer_base_model(store)
    if not base:
        print(
            f"lorastack serve: no base model to serve: the store at {store.root} has no adapters; pass "
            f"--base-model (or set {ENV_BASE_MODEL}) to serve a base model",
            file=sys.stderr,
        )
        return 2
    revision = getattr(args, "base_revision", None) or os.environ.get(ENV_BASE_REVISION) or None
    try:
        proxy_hops = int(os.environ.get(ENV_PROXY_HOPS) or 0)
    except ValueError:
        print(f"lorastack serve: {ENV_PROXY_HOPS} must be a whole number of proxies", file=sys.stderr)
        return 2
    from lorastack.serve.vllm_engine import choose_engine  # --engine, else $LORASTACK_ENGINE, else builtin

    try:
        engine = choose_engine(getattr(args, "engine", None))
    except ValueError as exc:
        print(f"lorastack serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        store,
        base,
        keys,
        base_revision=revision,
        quantize=not getattr(args, "no_4bit", False),
        max_batch_size=getattr(args, "max_batch_size", 16),
        max_queue=getattr(args, "max_queue", 64),
        max_loaded_adapters=getattr(args, "max_loaded_adapters", 8),
        trust_easy_auth=getattr(args, "trust_easy_auth", False),
        proxy_hops=proxy_hops,
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
