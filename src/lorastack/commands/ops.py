"""Day-2 operations on a stack: ``secrets``, ``endpoint``, ``restart``, ``export aitk``, ``preflight``,
``store rotate-key``. Same conventions as :mod:`lorastack.commands.cloud` (one-line failures, ``--debug``, test seams).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorastack.azure.credentials import Azure, CloudError
from lorastack.azure.jobs import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from lorastack.commands.cloud import _err, _out, connect, guarded


def _read_value(args: argparse.Namespace, name: str, stdin: Any = None, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    stdin = stdin or sys.stdin
    if getattr(args, "from_env", None):
        var = args.from_env
        if not env.get(var):
            raise CloudError(f"secret {name}: ${var} is not set (or empty); nothing was stored")
        return env[var]
    if getattr(args, "stdin", False):
        value = stdin.read()
        return value.removesuffix("\n")
    if stdin.isatty():
        return getpass.getpass(f"value for {name} (not echoed): ")
    raise CloudError(f"secret {name}: give the value with --from-env VAR or --stdin (it is never taken as an argument)")


def secrets_command(args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None,
                    stdin: Any = None, environ: dict[str, str] | None = None) -> int:
    """``lorastack secrets set NAME [--from-env VAR | --stdin] | list | rm NAME``: the stack's Key Vault."""
    from lorastack.azure.secrets import PICKUP, Vault, vault_name

    def body() -> int:
        action = getattr(args, "secrets_action", None) or "list"
        name = vault_name(args.name) if getattr(args, "name", None) else None
        if action in ("set", "rm") and not name:
            _err(f"lorastack secrets {action}: name the secret")
            return EXIT_USAGE
        value = _read_value(args, name or "", stdin, environ) if action == "set" else None
        vault = Vault(connect(args, credential, client_kwargs))
        if action == "set":
            version = vault.set(name or "", value or "")
            _out(f"secret {name} set in vault {vault.host} (version {version[:8] or '?'}); {PICKUP}")
        elif action == "list":
            rows = vault.list()
            if getattr(args, "json", False):
                _out(json.dumps([r.__dict__ for r in rows], indent=2, sort_keys=True))
            for r in rows if not getattr(args, "json", False) else []:
                state = "enabled" if r.enabled is not False else "disabled"
                _out(f"{r.name}\t{state}\t{r.updated or ''}")
            if not rows:
                _out(f"no secrets in vault {vault.host}")
        elif action == "rm":
            purge = vault.remove(name or "")
            where = f"; recoverable until {purge} (az keyvault secret recover)" if purge else ""
            _out(f"secret {name} deleted from vault {vault.host}{where}. A job or app that references it cannot "
                 "start a new execution or revision until it exists again.")
        else:
            _err(f"lorastack secrets: unknown action {action!r}")
            return EXIT_USAGE
        return EXIT_OK

    return guarded("secrets", args, body)


def _api_key(args: argparse.Namespace, azure: Azure) -> str | None:
    if getattr(args, "api_key", None):
        return str(args.api_key)
    if os.environ.get("LORASTACK_API_KEY"):
        return os.environ["LORASTACK_API_KEY"]
    if azure.outputs.key_vault_uri:
        from lorastack.azure.secrets import Vault

        keys = Vault(azure).get_value(getattr(args, "api_key_secret", None) or "inference-api-keys")
        return next((k.strip() for k in keys.split(",") if k.strip()), None)
    return None


def endpoint_command(args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> int:
    """``lorastack endpoint``: the inference URL, /readyz, and one authenticated completion, with a verdict."""
    from lorastack.azure.apps import smoke_test

    def body() -> int:
        azure = connect(args, credential, client_kwargs)
        url = azure.outputs.require("app_endpoint")
        _out(f"endpoint: {url}")
        _out(f"  OpenAI base URL: {url.rstrip('/')}/v1   chat UI: {url.rstrip('/')}/")
        key = _api_key(args, azure)
        res = smoke_test(azure, key, getattr(args, "model", None), wait_s=float(getattr(args, "wait", None) or 600),
                         note=_err, sleep=sleep)
        _out(f"  readyz: {res.ready_detail}")
        if res.model:
            _out(f"  model: {res.model}")
        if res.completion_detail:
            _out(f"  completion: {res.completion_detail}")
        if res.ok:
            _out("verdict: OK - the endpoint answers authenticated completions")
            return EXIT_OK
        _out("verdict: FAILED")
        for p in res.problems:
            _err(f"lorastack endpoint: {p}")
        return EXIT_FAILED

    return guarded("endpoint", args, body)


def restart_command(args: argparse.Namespace, *, credential: Any = None,
                    client_kwargs: dict[str, Any] | None = None) -> int:
    """``lorastack restart``: roll a new revision of the inference app (reloads image and secrets)."""
    from lorastack.azure.apps import restart

    def body() -> int:
        azure = connect(args, credential, client_kwargs)
        revision = restart(azure, getattr(args, "suffix", None))
        _out(f"new revision {revision} is rolling out; it pulls the image and resolves Key Vault secrets again. "
             "Check it with `lorastack endpoint` (the next `pulumi up` resets the revision suffix, rolling once more)")
        return EXIT_OK

    return guarded("restart", args, body)


def export_command(args: argparse.Namespace) -> int:
    """``lorastack export aitk --outputs FILE --out DIR``: the AI Toolkit's infra config files from stack outputs."""
    from lorastack.azure.apps import export_aitk
    from lorastack.azure.outputs import HOW_TO_GET_OUTPUTS, OUTPUTS_ENV, read_outputs_file

    def body() -> int:
        if getattr(args, "format", "aitk") != "aitk":
            _err(f"lorastack export: unknown format {args.format!r}; allowed: aitk")
            return EXIT_USAGE
        path = getattr(args, "outputs", None) or os.environ.get(OUTPUTS_ENV)
        if not path:
            raise CloudError(f"export aitk needs the stack outputs: {HOW_TO_GET_OUTPUTS}")
        written = export_aitk(read_outputs_file(path), Path(getattr(args, "out", None) or "."))
        for p in written:
            _out(f"wrote {p}")
        _out("open that folder in VS Code: the AI Toolkit's remote fine-tuning and inference use this stack")
        return EXIT_OK

    return guarded("export", args, body)


def _target(args: argparse.Namespace) -> Any:
    from lorastack.azure.stack import load_target

    return load_target(args.stack, getattr(args, "project_dir", None), getattr(args, "subscription", None))


def preflight_command(args: argparse.Namespace, *, credential: Any = None,
                      client_kwargs: dict[str, Any] | None = None) -> int:
    """``lorastack preflight --stack NAME``: one table of what `pulumi up` needs; non-zero on a blocker."""
    from lorastack.azure.preflight import BLOCKER, as_dicts, run_preflight

    def body() -> int:
        target = _target(args)
        azure = Azure(target.outputs(), credential, dict(client_kwargs or {}))
        rows = run_preflight(azure, target)
        blockers = [r for r in rows if r.status == BLOCKER]
        if getattr(args, "json", False):
            _out(json.dumps({"stack": target.stack, "blockers": len(blockers), "checks": as_dicts(rows)}, indent=2))
        else:
            width = max(len(r.check) for r in rows)
            _out(f"preflight for stack {target.stack} ({target.settings.location}, subscription "
                 f"{target.subscription_id}):")
            for r in rows:
                _out(f"  {r.status:<7} {r.check:<{width}}  {r.detail}")
                if r.fix:
                    _out(f"  {'':<7} {'':<{width}}  -> {r.fix}")
            _out(f"{len(blockers)} blocker(s)" + (": fix them before `pulumi up`" if blockers else
                                                   f"; ready for `pulumi up --stack {target.stack}`"))
        return EXIT_FAILED if blockers else EXIT_OK

    return guarded("preflight", args, body)


def store_command(args: argparse.Namespace, *, credential: Any = None,
                  client_kwargs: dict[str, Any] | None = None) -> int:
    """``lorastack store rotate-key --stack NAME [--finish]``: the two-key rotation, printing the steps it leaves."""
    from lorastack.azure.storage_keys import finish_rotation, start_rotation

    def body() -> int:
        if getattr(args, "store_action", "rotate-key") != "rotate-key":
            _err(f"lorastack store: unknown action {args.store_action!r}")
            return EXIT_USAGE
        target = _target(args)
        azure = Azure(target.outputs(), credential, dict(client_kwargs or {}))
        if getattr(args, "finish", False):
            step = finish_rotation(azure, target)
            _out(f"regenerated {step.regenerated} of storage account {target.storage_account}: the old key no longer "
                 f"works; generation {step.generation} is in use. Rotation complete.")
        else:
            step = start_rotation(azure, target)
            _out(f"regenerated {step.regenerated} of storage account {target.storage_account} (unused until "
                 f"generation {step.generation}); nothing running was touched. Next, in order:")
        for i, line in enumerate(step.next_steps, 1):
            _out(f"  {i}. {line}")
        return EXIT_OK

    return guarded("store", args, body)
