"""``lorastack finetune`` (cloud) and ``lorastack status``: Azure submission and status from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lorastack.cloud import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    WAIT_POLL_SECONDS,
    Azure,
    CloudError,
    StackOutputs,
    describe,
    execution_state,
    load_outputs,
    read_run,
    submit_run,
    wait_for_run,
)
from lorastack.store import STATUS_FILE, run_key


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _missing_sdk(cmd: str, exc: ImportError) -> int:
    _err(
        f"lorastack {cmd}: missing dependency {getattr(exc, 'name', None) or exc}; "
        "install it with `pip install 'lorastack[cloud]'`"
    )
    return EXIT_USAGE


def follow_hint(o: StackOutputs, run_id: str, execution: str | None, outputs_arg: str | None) -> str:
    outputs = f" --outputs {outputs_arg}" if outputs_arg else ""
    lines = [f"  lorastack status {run_id}{outputs}"]
    if execution:
        lines.append(
            f"  az containerapp job logs show -n {o.job_name} -g {o.resource_group} --execution {execution} "
            "--container trainer --follow"
        )
        lines.append(
            f"  az containerapp job execution show -n {o.job_name} -g {o.resource_group} --job-execution-name {execution}"
        )
    return "\n".join(lines)


def submit_command(
    args: argparse.Namespace,
    *,
    credential: Any = None,
    client_kwargs: dict[str, Any] | None = None,
    poll_seconds: float | None = None,
) -> int:
    """``lorastack finetune JOB.yaml`` (no --local): validate, upload to the share, queue, start the job.

    ``credential`` and ``client_kwargs`` (e.g. ``transport=``) are passed to the Azure SDK clients; the CLI
    leaves them unset (DefaultAzureCredential, real HTTP).
    """
    from lorastack.spec import spec_overrides_from_args
    from lorastack.trainer import is_user_error

    outputs_arg = getattr(args, "outputs", None)
    try:
        overrides = spec_overrides_from_args(args)
        outputs = load_outputs(outputs_arg)  # before staging: a missing output fails before any work
        sub = submit_run(
            args.spec,
            overrides,
            lambda: Azure(outputs, credential, dict(client_kwargs or {})),
            echo=_err,
        )
    except ImportError as exc:
        return _missing_sdk("finetune", exc)
    except CloudError as exc:
        _err(f"lorastack finetune: {exc}")
        return EXIT_FAILED
    except Exception as exc:
        if is_user_error(exc):
            _err(f"lorastack finetune: {exc}")
            return EXIT_FAILED
        raise
    if sub.already_succeeded is not None:
        adapter = sub.already_succeeded.get("adapter") or "its adapter"
        print(
            f"run {sub.run_id} already succeeded ({adapter}); nothing to start. "
            "Change the spec or data to train a new version."
        )
        return EXIT_OK
    if sub.already_running is not None:
        print(
            f"run {sub.run_id} is already being trained by execution {sub.execution} ({sub.already_running}); "
            "not starting another. Follow it with:\n"
            + follow_hint(outputs, sub.run_id, sub.execution, outputs_arg)
        )
    else:
        if sub.released_claim:
            print(
                f"run {sub.run_id}: execution {sub.released_claim} has ended; queued again to continue the run"
            )
        skipped = f", {len(sub.skipped)} dataset(s) already on the share" if sub.skipped else ""
        print(f"run {sub.run_id} queued on share {outputs.share_name}{skipped}")
        print(f"started execution {sub.execution} of job {outputs.job_name}")
        print("follow it with:\n" + follow_hint(outputs, sub.run_id, sub.execution, outputs_arg))
    if not getattr(args, "wait", False):
        return EXIT_OK
    try:
        return wait_for_run(
            Azure(outputs, credential, dict(client_kwargs or {})),
            sub.run_id,
            sub.execution,
            echo=_err,
            poll_seconds=WAIT_POLL_SECONDS if poll_seconds is None else poll_seconds,
        )
    except CloudError as exc:
        _err(f"lorastack finetune --wait: {exc}")
        return EXIT_FAILED


def status_command(
    args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None
) -> int:
    """``lorastack status [RUN_ID]``: a run's status from the share, or every run and queued entry."""
    try:
        outputs = load_outputs(getattr(args, "outputs", None))
        azure = Azure(outputs, credential, dict(client_kwargs or {}))
        share = azure.share()
        if args.run_id:
            state = read_run(share, args.run_id)
            if not state.exists:
                _err(
                    f"lorastack status: no run {args.run_id!r} on share {outputs.share_name} "
                    "(submit one with `lorastack finetune JOB.yaml`)"
                )
                return EXIT_FAILED
            ex_status = execution_state(azure, state.claimed_by) if state.claimed_by else None
            if args.json:
                print(
                    json.dumps(
                        {
                            "run_id": state.run_id,
                            "phase": state.phase,
                            "queued": state.queued,
                            "execution": state.claimed_by,
                            "execution_status": ex_status,
                            "status": state.status,
                        },
                        indent=2,
                        sort_keys=True,
                    )
                )
            else:
                print(describe(state, ex_status))
            return EXIT_OK
        runs = sorted(name for name, is_dir in share.list_dir("runs") if is_dir and not name.startswith("."))
        queued = {name for name, is_dir in share.list_dir("queue") if not is_dir and not name.startswith(".")}
        rows = []
        for run_id in sorted(set(runs) | queued):
            status = share.read_json(run_key(run_id, STATUS_FILE)) or {}
            rows.append(
                {
                    "run_id": run_id,
                    "phase": status.get("phase") or ("queued" if run_id in queued else "unknown"),
                    "updated_at": status.get("updated_at"),
                    "adapter": status.get("adapter"),
                }
            )
        adapters = []
        for name, is_dir in share.list_dir("adapters"):
            if is_dir and not name.startswith("."):
                latest = share.read_bytes(f"adapters/{name}/LATEST")
                if latest:
                    adapters.append(f"{name}@{latest.decode().strip()}")
        if args.json:
            print(json.dumps({"runs": rows, "adapters": sorted(adapters)}, indent=2, sort_keys=True))
        else:
            for r in rows:
                print(f"{r['run_id']}\t{r['phase']}\t{r['updated_at'] or ''}\t{r['adapter'] or ''}".rstrip())
            if not rows:
                print(f"no runs on share {outputs.share_name}")
            print("adapters: " + (", ".join(sorted(adapters)) or "none"))
        return EXIT_OK
    except ImportError as exc:
        return _missing_sdk("status", exc)
    except CloudError as exc:
        _err(f"lorastack status: {exc}")
        return EXIT_FAILED
