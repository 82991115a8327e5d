"""``lorastack finetune JOB.yaml --engine aml`` and ``lorastack aml trial|publish-best`` (the sweep's steps)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def finetune_aml_command(
    args: argparse.Namespace, *, credential: Any = None, client_kwargs: dict[str, Any] | None = None
) -> int:
    """Validate and stage the run, upload it to the store's share (not queued for the ACA job), then submit
    it to Azure ML as a command job, or as a sweep pipeline when the spec has a ``sweep:`` block.

    ``credential`` / ``client_kwargs`` (``transport=``) go to the Azure SDK clients; the CLI leaves them unset.
    """
    from lorastack.azure import aml
    from lorastack.azure.credentials import Azure, CloudError
    from lorastack.azure.jobs import stage_run, upload_run
    from lorastack.azure.outputs import load_outputs
    from lorastack.spec import spec_overrides_from_args
    from lorastack.store import Store
    from lorastack.trainer import is_user_error, load_run_spec

    outputs_arg = getattr(args, "outputs", None)
    nodes = int(getattr(args, "nodes", None) or 1)
    gpus = int(getattr(args, "gpus_per_node", None) or 1)
    try:
        target = aml.load_target(outputs_arg)  # before staging: a missing output fails before any work
        outputs = load_outputs(outputs_arg)  # the share the datastore points at
        with tempfile.TemporaryDirectory(prefix="lorastack-aml-") as tmp:
            staged = stage_run(Path(tmp) / "store", args.spec, spec_overrides_from_args(args))
            spec, _ = load_run_spec(Store(Path(tmp) / "store"), staged.run_id)
            _err(f"run {staged.run_id}: spec and data are valid")
            azure = Azure(outputs, credential, dict(client_kwargs or {}))
            upload_run(azure.share(), staged, _err, enqueue=False)  # the ACA job must not claim it
        client = aml.ml_client(target, azure.credential, **dict(client_kwargs or {}))
        sub = aml.submit(target, staged.run_id, spec, client, nodes=nodes, gpus_per_node=gpus)
    except ImportError as exc:
        _err(f"lorastack finetune --engine aml: missing dependency {exc.name!r}; pip install 'lorastack[aml]'")
        return EXIT_USAGE
    except (aml.AmlError, CloudError) as exc:
        _err(f"lorastack finetune: {exc}")
        return EXIT_FAILED
    except Exception as exc:
        if is_user_error(exc):
            _err(f"lorastack finetune: {exc}")
            return EXIT_FAILED
        raise
    what = "sweep pipeline" if sub.kind == "sweep" else f"command job ({nodes} x {gpus} GPU)"
    print(f"run {sub.run_id} submitted to Azure ML workspace {target.workspace} as {what} {sub.job_name} ({sub.status})")
    if sub.studio_url:
        print(f"  studio: {sub.studio_url}")
    hint = f" --outputs {outputs_arg}" if outputs_arg else ""
    print(f"follow it with: lorastack status {sub.run_id}{hint}")
    return EXIT_OK


def aml_command(args: argparse.Namespace) -> int:
    """``lorastack aml trial`` / ``lorastack aml publish-best``: the steps of a sweep, inside the trainer image."""
    if args.aml_command == "trial":
        return trial_command(args)
    return publish_best_command(args)


def trial_command(args: argparse.Namespace) -> int:
    """One sweep trial: derive a run with the swept values into the trial's own store, train it there,
    and report the validation loss (MLflow metric ``eval_loss``, and ``trial_metrics.json``)."""
    from lorastack.azure import aml
    from lorastack.distributed import maybe_launch
    from lorastack.store import Store, write_json_atomic
    from lorastack.trainer import is_user_error, run_training, setup_logging

    setup_logging()
    out = Path(args.out)
    source, store = Store(args.store), Store(out / "store").init()
    overrides = aml.trial_overrides(args.learning_rate, args.lora_r, args.epochs)
    try:
        trial_id = aml.prepare_trial(source, args.run, store, overrides)
    except Exception as exc:
        if is_user_error(exc) or isinstance(exc, ValueError):
            _err(f"lorastack aml trial: {exc}")
            return EXIT_FAILED
        raise
    code = maybe_launch(None, store, trial_id)
    if code is None:
        code = run_training(store, trial_id).exit_code
    status = store.read_status(trial_id) or {}
    if status.get("phase") != "succeeded":
        _err(f"lorastack aml trial: trial {trial_id} ended {status.get('phase')}: {status.get('error') or ''}")
        return code or EXIT_FAILED
    metrics = status.get("metrics") or {}
    loss = metrics.get("full_valid_loss")
    if loss is None:
        _err(f"lorastack aml trial: trial {trial_id} has no validation loss (the spec needs validation_file)")
        return EXIT_FAILED
    write_json_atomic(
        out / aml.TRIAL_METRICS,
        {"run_id": args.run, "trial_run_id": trial_id, "overrides": overrides, aml.PRIMARY_METRIC: loss,
         "adapter": status.get("adapter")},
    )
    if not aml.log_metric(aml.PRIMARY_METRIC, float(loss)):
        _err("lorastack aml trial: mlflow is not installed, so Azure ML cannot rank this trial; "
             "the trainer image needs mlflow and azureml-mlflow")
    print(f"trial {trial_id} {overrides}: {aml.PRIMARY_METRIC} {loss:.4f}")
    return EXIT_OK


def publish_best_command(args: argparse.Namespace) -> int:
    """Publish the best trial's adapter (the sweep node's output) to the shared store, with the sweep's result."""
    from lorastack.azure import aml
    from lorastack.store import Store, StoreError

    trial = Path(args.trial)
    try:
        info = json.loads((trial / aml.TRIAL_METRICS).read_text(encoding="utf-8"))
        adapter = Store(trial / "store").adapter(info["adapter"])  # verifies every file
    except (OSError, ValueError, KeyError, StoreError) as exc:
        _err(f"lorastack aml publish-best: {trial} holds no finished trial ({exc})")
        return EXIT_FAILED
    if info.get("run_id") != args.run:
        _err(f"lorastack aml publish-best: {trial} is a trial of run {info.get('run_id')!r}, not {args.run!r}")
        return EXIT_FAILED
    manifest = {k: v for k, v in adapter.manifest.items() if k not in ("name", "version", "files", "published_at")}
    manifest["sweep"] = {k: info.get(k) for k in ("run_id", "trial_run_id", "overrides", aml.PRIMARY_METRIC)}
    pub = Store(args.store).publish_adapter(adapter.name, adapter.path, manifest)
    print(f"published the best trial {info['trial_run_id']} ({aml.PRIMARY_METRIC} {info[aml.PRIMARY_METRIC]:.4f}) "
          f"as {pub.ref}")
    return EXIT_OK
