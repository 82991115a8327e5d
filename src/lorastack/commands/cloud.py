"""Cloud commands on a provisioned stack: ``finetune`` (cloud), ``status``, ``logs``, and the share half of
``adapters`` / ``runs``.

Every handler takes keyword-only test seams, ``credential=`` and ``client_kwargs=`` (e.g. ``transport=``), passed to
the Azure SDK clients; the CLI leaves them unset (DefaultAzureCredential, real HTTP). Failures print one line on
stderr naming what failed and what to do; the SDK's own detail (credential chain, HTTP) appears only with
``--debug`` or ``$LORASTACK_DEBUG``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorastack.azure.credentials import Azure, CloudError
from lorastack.azure.jobs import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    WAIT_POLL_SECONDS,
    describe,
    execution_state,
    follow_run,
    read_run,
    submit_run,
    wait_for_run,
)
from lorastack.azure.outputs import StackOutputs, load_outputs


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _out(msg: str) -> None:
    print(msg, flush=True)


def debug_enabled(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False) or os.environ.get("LORASTACK_DEBUG"))


def quiet_sdk_logs(debug: bool) -> None:
    """Keep the Azure SDKs' log records (credential-chain dumps, HTTP lines) off the terminal unless --debug."""
    log = logging.getLogger("azure")
    if debug:
        log.propagate = True
        log.setLevel(logging.DEBUG)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
        return
    log.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())


def _missing_sdk(cmd: str, exc: ImportError) -> int:
    _err(
        f"lorastack {cmd}: missing dependency {getattr(exc, 'name', None) or exc}; "
        "install it with `pip install 'lorastack[cloud]'`"
    )
    return EXIT_USAGE


def report_failure(cmd: str, exc: CloudError, debug: bool) -> int:
    """One line on stderr; with --debug, the chain of SDK exceptions behind it."""
    _err(f"lorastack {cmd}: {exc}")
    if debug and exc.__cause__ is not None:
        _err("".join(traceback.format_exception(type(exc.__cause__), exc.__cause__, exc.__cause__.__traceback__)))
    return EXIT_FAILED


def guarded(cmd: str, args: argparse.Namespace, body: Callable[[], int]) -> int:
    """Run ``body`` with the SDK logs quieted, turning CloudError / a missing SDK into one line and an exit code."""
    debug = debug_enabled(args)
    quiet_sdk_logs(debug)
    try:
        return body()
    except ImportError as exc:
        return _missing_sdk(cmd, exc)
    except CloudError as exc:
        return report_failure(cmd, exc, debug)


def connect(args: argparse.Namespace, credential: Any = None, client_kwargs: dict[str, Any] | None = None) -> Azure:
    """The stack outputs (``--outputs`` / $LORASTACK_OUTPUTS / env) and a checked credential."""
    return Azure(load_outputs(getattr(args, "outputs", None)), credential, dict(client_kwargs or {}))


def follow_hint(o: StackOutputs, run_id: str, execution: str | None, outputs_arg: str | None) -> str:
    outputs = f" --outputs {outputs_arg}" if outputs_arg else ""
    lines = [f"  lorastack logs {run_id} --follow{outputs}", f"  lorastack status {run_id}{outputs}"]
    if execution:
        lines.append(
            f"  az containerapp job logs show -n {o.job_name} -g {o.resource_group} --execution {execution} "
            "--container trainer --follow"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# finetune (cloud) and status
# ---------------------------------------------------------------------------------------------------------------
def submit_command(
    args: argparse.Namespace,
    *,
    credential: Any = None,
    client_kwargs: dict[str, Any] | None = None,
    poll_seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``lorastack finetune JOB.yaml`` (no --local): validate, refuse what the job cannot run, upload, queue, start;
    with ``--wait``, stream the live log until the run ends."""
    from lorastack.spec import spec_overrides_from_args
    from lorastack.trainer import is_user_error

    outputs_arg = getattr(args, "outputs", None)
    debug = debug_enabled(args)
    quiet_sdk_logs(debug)
    try:
        overrides = spec_overrides_from_args(args)
        outputs = load_outputs(outputs_arg)  # before staging: a missing output fails before any work
        sub = submit_run(args.spec, overrides, lambda: Azure(outputs, credential, dict(client_kwargs or {})), echo=_err)
    except ImportError as exc:
        return _missing_sdk("finetune", exc)
    except CloudError as exc:
        return report_failure("finetune", exc, debug)
    except Exception as exc:
        if is_user_error(exc):
            _err(f"lorastack finetune: {exc}")
            return EXIT_FAILED
        raise
    if sub.already_succeeded is not None:
        adapter = sub.already_succeeded.get("adapter") or "its adapter"
        _out(f"run {sub.run_id} already succeeded ({adapter}); nothing to start. "
             "Change the spec or data to train a new version.")
        return EXIT_OK
    if sub.already_running is not None:
        _out(f"run {sub.run_id} is already being trained by execution {sub.execution} ({sub.already_running}); "
             "not starting another. Follow it with:\n" + follow_hint(outputs, sub.run_id, sub.execution, outputs_arg))
    else:
        if sub.released_claim:
            _out(f"run {sub.run_id}: execution {sub.released_claim} has ended; queued again to continue the run")
        skipped = f", {len(sub.skipped)} dataset(s) already on the share" if sub.skipped else ""
        _out(f"run {sub.run_id} queued on share {outputs.share_name}{skipped}")
        _out(f"started execution {sub.execution} of job {outputs.job_name}")
        _out("follow it with:\n" + follow_hint(outputs, sub.run_id, sub.execution, outputs_arg))
    if not getattr(args, "wait", False):
        return EXIT_OK
    azure = Azure(outputs, credential, dict(client_kwargs or {}))
    poll = WAIT_POLL_SECONDS if poll_seconds is None else poll_seconds
    try:
        return follow_run(azure, sub.run_id, sub.execution, _out, _err, poll_seconds=min(poll, 5.0), sleep=sleep)
    except CloudError as exc:
        _err(f"lorastack finetune --wait: no live log ({exc}); following the run's status instead")
    try:
        return wait_for_run(azure, sub.run_id, sub.execution, echo=_err, poll_seconds=poll)
    except CloudError as exc:
        return report_failure("finetune --wait", exc, debug)


def status_command(
    args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None
) -> int:
    """``lorastack status [RUN_ID]``: a run's status from the share, or every run and adapter."""
    from lorastack.azure import store_ops

    def body() -> int:
        azure = connect(args, credential, client_kwargs)
        share = azure.share()
        if args.run_id:
            state = read_run(share, args.run_id)
            if not state.exists:
                _err(f"lorastack status: no run {args.run_id!r} on share {azure.outputs.share_name} "
                     "(submit one with `lorastack finetune JOB.yaml`)")
                return EXIT_FAILED
            ex_status = execution_state(azure, state.claimed_by) if state.claimed_by else None
            if args.json:
                _out(json.dumps({"run_id": state.run_id, "phase": state.phase, "queued": state.queued,
                                 "execution": state.claimed_by, "execution_status": ex_status,
                                 "status": state.status}, indent=2, sort_keys=True))
            else:
                _out(describe(state, ex_status))
            return EXIT_OK
        rows = store_ops.list_runs(share)
        adapters = [f"{a['name']}@{a['latest']}" for a in store_ops.list_adapters(share) if a["latest"]]
        if args.json:
            _out(json.dumps({"runs": rows, "adapters": sorted(adapters)}, indent=2, sort_keys=True))
        else:
            for r in rows:
                _out(f"{r['run_id']}\t{r['phase']}\t{r['updated_at'] or ''}\t{r['adapter'] or ''}".rstrip())
            if not rows:
                _out(f"no runs on share {azure.outputs.share_name}")
            _out("adapters: " + (", ".join(sorted(adapters)) or "none"))
        return EXIT_OK

    return guarded("status", args, body)


# ---------------------------------------------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------------------------------------------
def logs_command(
    args: argparse.Namespace,
    *,
    credential: Any = None,
    client_kwargs: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    poll_seconds: float = 5.0,
) -> int:
    """``lorastack logs RUN_ID|EXECUTION|--app [--follow] [--since 1h] [--tail N]``: live, else Log Analytics."""
    from lorastack.azure import logs

    def body() -> int:
        try:
            since = logs.parse_since(getattr(args, "since", None))
        except ValueError as exc:
            _err(f"lorastack logs: {exc}")
            return EXIT_USAGE
        follow = bool(getattr(args, "follow", False))
        tail = int(getattr(args, "tail", None) or 100)
        if getattr(args, "app", False) == bool(getattr(args, "run_id", None)):
            _err("lorastack logs: give a RUN_ID (or a job execution name), or --app for the inference app")
            return EXIT_USAGE
        azure = connect(args, credential, client_kwargs)
        o = azure.outputs
        if getattr(args, "app", False):
            app = o.require("app_name")
            if not since and logs.follow_app(azure, _out, _err, follow=follow, tail=tail):
                return EXIT_OK
            window = logs.execution_window(None, since or logs.timedelta(hours=1))
            return _history(azure, logs.history_query(app=app), window, f"app {app}")
        execution = _execution_of(azure, args.run_id, follow, sleep, poll_seconds)
        if execution is None:
            return EXIT_FAILED
        ex = logs.get_execution(azure, execution)
        if ex is None:
            _err(f"lorastack logs: job {o.job_name} has no execution {execution!r}")
            return EXIT_FAILED
        if not ex.done and not since:
            ex, printed = logs.follow_execution(azure, execution, _out, _err, follow=follow, tail=tail,
                                                poll_s=poll_seconds, sleep=sleep)
            if printed or not (ex and ex.done):
                if ex and ex.done:
                    _err(f"execution {execution} {ex.status}")
                return EXIT_OK
        # ended (or --since asked for history): Log Analytics
        window = logs.execution_window(ex, since)
        rc = _history(azure, logs.history_query(job=o.job_name, execution=execution), window,
                      f"execution {execution}")
        if ex and ex.done:
            _err(f"execution {execution} {ex.status}")
        return rc

    return guarded("logs", args, body)


def _execution_of(azure: Azure, ref: str, follow: bool, sleep: Callable[[float], None], poll_s: float) -> str | None:
    """The job execution for a run id (its claim), waiting while the run is queued with --follow; an execution
    name passes through."""
    share = azure.share()
    said = False
    while True:
        state = read_run(share, ref)
        if not state.exists:
            return ref  # not a run on the share: an execution name
        if state.claimed_by:
            return state.claimed_by
        if not follow:
            _err(f"lorastack logs: run {ref} is {state.phase}: no execution has claimed it yet "
                 "(use --follow to wait for it)")
            return None
        if not state.queued:
            _err(f"lorastack logs: run {ref} is {state.phase} and not queued: no execution will train it")
            return None
        if not said:
            _err(f"run {ref} is queued: waiting for a job execution to claim it")
            said = True
        sleep(poll_s)


def _history(azure: Azure, query: str, window: tuple[Any, Any], what: str) -> int:
    from lorastack.azure import logs

    if not azure.outputs.log_workspace_id:
        _err(f"lorastack logs: {what} has no live replica, and its history is in Log Analytics: add the stack output "
             "logAnalyticsWorkspaceId to the outputs file (or set $LORASTACK_LOG_WORKSPACE_ID)")
        return EXIT_FAILED
    rows = logs.query_history(azure, query, *window)
    logs.print_history(rows, _out)
    if not rows:
        _err(f"no log lines for {what} in Log Analytics between {window[0]:%Y-%m-%d %H:%M} and {window[1]:%H:%M} UTC "
             "(ingestion lags by a few minutes; widen with --since 6h)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# adapters and runs on the share (the CLI's `adapters` / `runs` with --outputs dispatch here)
# ---------------------------------------------------------------------------------------------------------------
def _action(args: argparse.Namespace, *names: str) -> str:
    for n in names:
        value = getattr(args, n, None)
        if value:
            return str(value)
    return "list"


def _ref_arg(args: argparse.Namespace) -> str | None:
    for n in ("ref", "adapter", "name", "run_id"):
        value = getattr(args, n, None)
        if value:
            return str(value)
    return None


def _local_store(args: argparse.Namespace) -> Path:
    from lorastack.store import open_store

    return open_store(getattr(args, "to", None) or getattr(args, "store", None)).root


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr (a line every few seconds when stderr is not a terminal)."""
    from lorastack.azure.share import mib

    state = {"last": 0.0, "shown": -1}
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        now = time.monotonic()
        if tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            sys.stderr.write(f"\r{label} [{bar}] {pct:3d}% {mib(done)} / {mib(total)}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif pct != state["shown"] and (done >= total or now - state["last"] > 2.0):
            state["last"], state["shown"] = now, pct
            _err(f"{label}: {pct}% ({mib(done)} of {mib(total)})")

    return show


def adapters_command(
    args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None
) -> int:
    """``lorastack adapters list|show|promote|rollback|delete|pull ... --outputs FILE``: adapters on the share."""
    from lorastack.azure import store_ops

    def body() -> int:
        action = _action(args, "action", "adapters_action", "adapters_command")
        ref = _ref_arg(args)
        if action != "list" and not ref:
            _err(f"lorastack adapters {action}: name the adapter (NAME or NAME@vN)")
            return EXIT_USAGE
        share = connect(args, credential, client_kwargs).share()
        reason = getattr(args, "reason", None) or ""
        as_json = bool(getattr(args, "json", False))
        if action == "list":
            rows = store_ops.list_adapters(share)
            if as_json:
                _out(json.dumps(rows, indent=2, sort_keys=True))
            for r in rows if not as_json else []:
                _out(f"{r['name']}\t{r['latest'] or '-'}\t{', '.join(r['versions'])}")
            if not rows and not as_json:
                _out(f"no adapters on share {share.outputs.share_name}")
        elif action == "show":
            doc = store_ops.show_adapter(share, ref or "")
            if as_json:
                _out(json.dumps(doc, indent=2, sort_keys=True, default=str))
            else:
                m = doc["manifest"]
                _out(f"{doc['adapter']} (LATEST: {doc['latest'] or '-'})")
                _out(f"  base model: {m.get('base_model')}@{m.get('base_revision') or 'main'}")
                for key in ("run_id", "published_at"):
                    if m.get(key):
                        _out(f"  {key}: {m[key]}")
                if m.get("metrics"):
                    _out("  metrics: " + ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m["metrics"].items())))
                if m.get("promotion"):
                    _out(f"  promotion: {json.dumps(m['promotion'], sort_keys=True)}")
                if doc["eval"]:
                    _out(f"  eval: against {doc['eval'].get('against')}: "
                         + json.dumps(doc["eval"].get("metrics"), sort_keys=True))
                for e in doc["promotions"]:
                    _out(f"  {e.get('at')} {e.get('action')} {e.get('version')}: {e.get('reason')}")
        elif action == "promote":
            e = store_ops.promote(share, ref or "", reason)
            _out(f"{ref}: promoted (LATEST is {e['version']}); the app serves it on its next request for the adapter")
        elif action == "rollback":
            e = store_ops.rollback(share, ref or "", reason)
            _out(f"{ref}: rolled back to {e['version']} (LATEST)")
        elif action == "delete":
            n = store_ops.delete_version(share, ref or "")
            _out(f"{ref}: deleted ({n} files)")
        elif action == "pull":
            root = _local_store(args)
            got = store_ops.pull_adapter(share, ref or "", root, progress_bar(f"pulling {ref}"))
            _out(f"{got.adapter}: {got.files} files ({got.bytes} bytes) in {got.path}")
        else:
            _err(f"lorastack adapters: unknown action {action!r}")
            return EXIT_USAGE
        return EXIT_OK

    return guarded("adapters", args, body)


def runs_command(
    args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None
) -> int:
    """``lorastack runs list|show|rm|pull ... --outputs FILE``: runs on the share."""
    from lorastack.azure import store_ops

    def body() -> int:
        action = _action(args, "action", "runs_action", "runs_command")
        run_id = getattr(args, "run_id", None) or _ref_arg(args)
        if action != "list" and not run_id:
            _err(f"lorastack runs {action}: name the run (RUN_ID)")
            return EXIT_USAGE
        azure = connect(args, credential, client_kwargs)
        share = azure.share()
        as_json = bool(getattr(args, "json", False))
        if action == "list":
            rows = store_ops.list_runs(share)
            if as_json:
                _out(json.dumps(rows, indent=2, sort_keys=True))
            for r in rows if not as_json else []:
                _out(f"{r['run_id']}\t{r['phase']}\t{r['updated_at'] or ''}\t{r['adapter'] or ''}".rstrip())
            if not rows and not as_json:
                _out(f"no runs on share {share.outputs.share_name}")
        elif action == "show":
            state = read_run(share, run_id)
            if not state.exists:
                _err(f"lorastack runs show: no run {run_id!r} on share {share.outputs.share_name}")
                return EXIT_FAILED
            ex_status = execution_state(azure, state.claimed_by) if state.claimed_by else None
            tail = store_ops.results_tail(share, run_id)
            if as_json:
                _out(json.dumps({"run_id": run_id, "phase": state.phase, "execution": state.claimed_by,
                                 "execution_status": ex_status, "status": state.status, "results_tail": tail},
                                indent=2, sort_keys=True))
            else:
                _out(describe(state, ex_status))
                for line in tail:
                    _out(f"  {line}")
        elif action == "rm":
            n = store_ops.remove_run(
                share, run_id, lambda ex: (execution_state(azure, ex) or "Succeeded") not in
                ("Succeeded", "Failed", "Stopped"))
            _out(f"run {run_id}: removed ({n} files); its datasets stay (content-addressed, shared)")
        elif action == "pull":
            root = _local_store(args)
            got = store_ops.pull_run(share, run_id, root, progress_bar(f"pulling {run_id}"))
            _out(f"run {run_id} ({got['phase']}): {', '.join(got['files'])} -> {root}")
            if got["adapter"]:
                _out(f"adapter {got['adapter']} -> {root / 'adapters'}")
        else:
            _err(f"lorastack runs: unknown action {action!r}")
            return EXIT_USAGE
        return EXIT_OK

    return guarded("runs", args, body)
