"""``lorastack finetune`` and ``lorastack train``: run preparation and training from the command line."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from lorastack.store import SPEC_FILE, open_store
from lorastack.trainer import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    NEXT_RUN,
    describe_promotion,
    is_user_error,
    log,
    prepare_run,
    run_training,
    setup_logging,
)


def finetune_command(args: argparse.Namespace) -> int:
    """``lorastack finetune JOB.yaml --local``: validate, put the data in the store, train, publish."""
    started = time.monotonic()
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    if not args.local and (getattr(args, "engine", None) or os.environ.get("LORASTACK_TRAIN_ENGINE")) == "aml":
        from lorastack.commands.aml import finetune_aml_command  # Azure ML command job or sweep

        return finetune_aml_command(args)
    if not args.local:
        from lorastack.commands.cloud import submit_command

        return submit_command(args)
    try:
        from lorastack.spec import spec_overrides_from_args

        store = open_store(args.store).init()  # a read-only or unwritable store fails here, clearly
        run_id = prepare_run(store, args.spec, spec_overrides_from_args(args))
    except Exception as exc:
        if is_user_error(exc):
            print(f"lorastack finetune: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(f"run {run_id} (store {store.root})", file=sys.stderr)
    outcome = run_training(store, run_id, started=started, interactive=sys.stderr.isatty(), verbose=verbose)
    if outcome.phase == "succeeded":
        print(f"adapter {outcome.adapter_ref} published in {store.adapters_dir}")
        print(describe_promotion(outcome.adapter_ref, outcome.promotion or {}))
    elif outcome.phase in ("preempted", "stopped"):
        print(f"run {run_id} {outcome.phase} with a checkpoint; run the same command again to resume")
    else:
        print(f"run {run_id} failed; see {store.run_dir(run_id) / 'status.json'}", file=sys.stderr)
    return outcome.exit_code


def train_command(args: argparse.Namespace) -> int:
    """``lorastack train --store DIR --run RUN_ID``: the training image's entrypoint."""
    started = time.monotonic()
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    store = open_store(args.store)
    args.run = args.run or os.environ.get("LORASTACK_RUN_ID") or NEXT_RUN
    if args.run == NEXT_RUN:
        # Cloud submissions are queued on the store (lorastack.azure.jobs); the job execution claims the oldest.
        # A replica retried within the same execution gets its own run back, and resumes it.
        claimant = os.environ.get("CONTAINER_APP_JOB_EXECUTION_NAME") or socket.gethostname()
        run_id = store.claim_run(claimant)
        if run_id is None:
            print(f"lorastack train: no queued run in {store.queue_dir}; nothing to do", file=sys.stderr)
            return EXIT_OK
        log.info("execution %s claimed run %s", claimant, run_id)
        args.run = run_id
    if not (store.runs_dir / args.run / SPEC_FILE).is_file():
        print(
            f"lorastack train: no {SPEC_FILE} for run {args.run!r} under {store.runs_dir}; "
            "create runs with `lorastack finetune JOB.yaml`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from lorastack.distributed import maybe_launch  # --nproc N: the same command under torchrun

    if (code := maybe_launch(getattr(args, "nproc", None), store, args.run)) is not None:
        return code
    outcome = run_training(store, args.run, started=started, interactive=sys.stderr.isatty(), verbose=verbose)
    if outcome.phase == "succeeded":
        print(f"adapter {outcome.adapter_ref}: {describe_promotion(outcome.adapter_ref, outcome.promotion or {})}")
    return outcome.exit_code
