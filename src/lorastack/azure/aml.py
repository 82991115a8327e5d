"""Azure ML as the training engine for runs that outgrow one ACA replica (``lorastack finetune --engine aml``).

The run is prepared and uploaded to the store on the share exactly as for the ACA job (spec.yaml and the
content-addressed datasets; not queued, so the ACA job never claims it). Then one of two Azure ML jobs runs
the same trainer image against the same store, the file share registered as a datastore and mounted
read-write:

- a **command job**: ``lorastack train --store <mount> --run <id>`` on ``nodes`` x ``gpus_per_node``
  processes (Azure ML's PyTorch distribution starts one process per GPU and sets RANK / WORLD_SIZE /
  MASTER_ADDR, so the trainer runs data-parallel as under torchrun, rank 0 writing the store). A
  low-priority node that is preempted restarts the job, which resumes from the run's newest complete
  checkpoint on the store; so does submitting the same spec again.
- a **sweep** (the spec has a ``sweep:`` block): a pipeline whose sweep node runs one trial per
  combination of the listed learning rates / LoRA ranks / epochs (``lorastack aml trial``, each trial in
  its own output folder, the shared store mounted read-only), with the validation loss as the primary
  metric (minimised); its best trial's output goes to a last step, ``lorastack aml publish-best``, which
  publishes that trial's adapter to the shared store. So one adapter version is published per sweep.

``lorastack status`` / ``logs`` / ``eval`` read the same store, whichever engine trained the run.

Where the workspace is: stack outputs ``amlWorkspaceName``, ``amlComputeName``, ``amlDatastoreName`` (the
provisioning team's Azure ML resources), ``subscriptionId`` and ``resourceGroupName`` (or
``amlResourceGroupName``), and the trainer image (``trainerImage``, or ``lorastack:images.trainer``);
each can also come from an environment variable (``LORASTACK_AML_WORKSPACE``, ``LORASTACK_AML_COMPUTE``,
``LORASTACK_AML_DATASTORE``, ``LORASTACK_TRAINER_IMAGE``, ``LORASTACK_SUBSCRIPTION_ID``,
``LORASTACK_RESOURCE_GROUP``).

azure-ai-ml (the ``aml`` extra) is imported inside functions only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

PRIMARY_METRIC = "eval_loss"  # logged by each trial (MLflow), minimised by the sweep
TRIAL_METRICS = "trial_metrics.json"  # written by each trial next to its store, read by publish-best
EXPERIMENT = "lorastack"

# field -> (output keys, in order, env vars, what it is)
_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "subscription_id": (("subscriptionId",), ("LORASTACK_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID"), "subscription id"),
    "resource_group": (("amlResourceGroupName", "resourceGroupName"), ("LORASTACK_RESOURCE_GROUP",), "resource group"),
    "workspace": (("amlWorkspaceName",), ("LORASTACK_AML_WORKSPACE",), "Azure ML workspace name"),
    "compute": (("amlComputeName",), ("LORASTACK_AML_COMPUTE",), "Azure ML compute cluster name"),
    "datastore": (("amlDatastoreName",), ("LORASTACK_AML_DATASTORE",), "Azure ML datastore of the store share"),
    "image": (("trainerImage",), ("LORASTACK_TRAINER_IMAGE",), "trainer image reference"),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{1,254}$")


class AmlError(Exception):
    """An Azure ML submission cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class AmlTarget:
    """Where Azure ML jobs go: the workspace, its cluster, the store's datastore, and the trainer image."""

    subscription_id: str
    resource_group: str
    workspace: str
    compute: str
    datastore: str
    image: str

    @property
    def store_uri(self) -> str:
        """The store (the file share's root) as an Azure ML datastore path."""
        return f"azureml://datastores/{self.datastore}/paths/"


def load_target(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> AmlTarget:
    """The AmlTarget from stack outputs JSON (``pulumi stack output --json``) and/or environment variables.

    Tolerant of outputs it does not know; raises AmlError naming every missing or malformed value.
    """
    env = dict(os.environ if environ is None else environ)
    path = path or env.get("LORASTACK_OUTPUTS") or None
    raw: dict[str, Any] = {}
    where = "the environment"
    if path:
        where = str(path)
        from lorastack.azure.credentials import CloudError
        from lorastack.azure.outputs import read_outputs_file

        try:
            raw = read_outputs_file(path)  # the same reading, and the same errors, as every cloud command
        except CloudError as exc:
            raise AmlError(str(exc)) from None
    images = raw.get("lorastack:images") or raw.get("images")
    if isinstance(images, dict) and images.get("trainer") and not raw.get("trainerImage"):
        raw["trainerImage"] = images["trainer"]
    values: dict[str, str] = {}
    problems: list[str] = []
    for fld, (keys, env_vars, what) in _SOURCES.items():
        value = next((raw[k] for k in keys if raw.get(k) not in (None, "")), None)
        if value is None:
            value = next((env[v] for v in env_vars if env.get(v)), None)
        if value is None:
            problems.append(f"missing {keys[0]!r} ({what}): not in {where} and ${env_vars[0]} is not set")
        elif fld in ("workspace", "compute", "datastore") and not _NAME.match(str(value)):
            problems.append(f"{keys[0]}: {value!r} is not a valid {what}")
        else:
            values[fld] = str(value)
    if problems:
        raise AmlError(
            "; ".join(problems) + ". The platform stack provisions the Azure ML workspace, cluster and datastore "
            "(outputs amlWorkspaceName, amlComputeName, amlDatastoreName); pass --outputs FILE or set the variables."
        )
    return AmlTarget(**values)


# -- the job entities (built and validated offline) -------------------------------------------------------


def _environment(target: AmlTarget) -> Any:
    from azure.ai.ml.entities import Environment

    return Environment(image=target.image, description="the lorastack trainer image")


def command_job(target: AmlTarget, run_id: str, *, nodes: int = 1, gpus_per_node: int = 1) -> Any:
    """The Azure ML command job that trains ``run_id`` from the store on ``nodes`` x ``gpus_per_node`` GPUs."""
    from azure.ai.ml import Output, PyTorchDistribution, command

    if nodes < 1 or gpus_per_node < 1:
        raise AmlError(f"nodes ({nodes}) and GPUs per node ({gpus_per_node}) must be at least 1")
    distributed = nodes * gpus_per_node > 1
    return command(
        name=None,  # Azure ML names the job; the run id is its display name and tag
        display_name=run_id,
        experiment_name=EXPERIMENT,
        description=f"lorastack run {run_id}",
        tags={"lorastack_run_id": run_id},
        command=f"lorastack train --store ${{{{outputs.store}}}} --run {run_id}",
        environment=_environment(target),
        compute=target.compute,
        outputs={"store": Output(type="uri_folder", path=target.store_uri, mode="rw_mount")},
        instance_count=nodes,
        distribution=PyTorchDistribution(process_count_per_instance=gpus_per_node) if distributed else None,
        # Azure ML starts one process per GPU itself: the trainer must not start torchrun again.
        environment_variables={"LORASTACK_NPROC": "1", "HF_HUB_DISABLE_TELEMETRY": "1"},
    )


def search_space(sweep: Any) -> dict[str, Any]:
    """The sweep's values as Azure ML ``Choice`` search spaces, keyed by the trial's input names."""
    from azure.ai.ml.sweep import Choice

    space: dict[str, Any] = {}
    for key in ("learning_rate", "lora_r", "epochs"):
        values = getattr(sweep, key)
        if values:
            space[key] = Choice(values=list(values))
    if not space:
        raise AmlError("the spec's sweep: block lists no values: give learning_rate, lora_r and/or epochs lists")
    return space


def sweep_pipeline(target: AmlTarget, run_id: str, spec: Any, *, gpus_per_node: int = 1) -> Any:
    """The pipeline job: a sweep over the spec's ``sweep:`` values, then publishing the best trial's adapter."""
    from azure.ai.ml import Input, Output, command, dsl

    sweep = spec.sweep
    if sweep is None:
        raise AmlError(f"run {run_id}: the spec has no sweep: block")
    if spec.validation_file is None:
        raise AmlError(
            f"run {run_id}: a sweep needs validation_file in the spec: its trials are ranked by the validation loss"
        )
    space = search_space(sweep)
    env = _environment(target)
    defaults = {"learning_rate": spec.training.learning_rate, "lora_r": spec.lora.r, "epochs": spec.training.epochs}
    args = " ".join(f"--{k.replace('_', '-')} ${{{{inputs.{k}}}}}" for k in space)
    trial = command(
        display_name=f"{run_id} trial",
        command=f"lorastack aml trial --store ${{{{inputs.store}}}} --run {run_id} --out ${{{{outputs.trial}}}} {args}",
        environment=env,
        inputs={"store": Input(type="uri_folder", path=target.store_uri, mode="ro_mount"),
                **{k: defaults[k] for k in space}},
        outputs={"trial": Output(type="uri_folder", mode="rw_mount")},
        environment_variables={"LORASTACK_NPROC": str(gpus_per_node) if gpus_per_node > 1 else "1"},
    )
    publish = command(
        display_name=f"{run_id} publish best",
        command=f"lorastack aml publish-best --trial ${{{{inputs.best}}}} --store ${{{{outputs.store}}}} --run {run_id}",
        environment=env,
        inputs={"best": Input(type="uri_folder")},
        outputs={"store": Output(type="uri_folder", path=target.store_uri, mode="rw_mount")},
    )

    @dsl.pipeline(name=None, display_name=f"{run_id} sweep", experiment_name=EXPERIMENT, compute=target.compute)
    def lorastack_sweep():
        # the variables' names are the nodes' names in the pipeline
        trials = trial(
            store=Input(type="uri_folder", path=target.store_uri, mode="ro_mount"),
            **space,
        ).sweep(
            primary_metric=PRIMARY_METRIC,
            goal="minimize",
            sampling_algorithm=sweep.sampling,
            compute=target.compute,
        )
        trials.set_limits(max_total_trials=sweep.max_trials, max_concurrent_trials=sweep.max_concurrent_trials)
        publish_best = publish(best=trials.outputs.trial)  # a sweep node's outputs are its best trial's
        publish_best.display_name = f"{run_id} publish best"

    job = lorastack_sweep()
    job.tags = {"lorastack_run_id": run_id, "lorastack_sweep": "true"}
    return job


def validate(job: Any) -> None:
    """azure-ai-ml's own offline validation of a job entity; raises AmlError listing what it rejects."""
    result = job._validate()  # the schema and the entity's checks; no request is sent
    if not result.passed:
        raise AmlError("Azure ML rejects the job: " + "; ".join(f"{k}: {v}" for k, v in result.error_messages.items()))


# -- submitting ---------------------------------------------------------------------------------------


def ml_client(target: AmlTarget, credential: Any = None, **client_kwargs: Any) -> Any:
    """An MLClient for the target's workspace (tests pass ``credential`` and ``transport=``)."""
    from azure.ai.ml import MLClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    return MLClient(credential, target.subscription_id, target.resource_group, target.workspace, **client_kwargs)


@dataclass
class AmlSubmission:
    run_id: str
    job_name: str
    status: str
    studio_url: str | None
    kind: str  # "command" | "sweep"


def submit(target: AmlTarget, run_id: str, spec: Any, client: Any, *, nodes: int = 1, gpus_per_node: int = 1) -> AmlSubmission:
    """Validate offline, then create the command job (or the sweep pipeline) for the prepared run ``run_id``."""
    from azure.core.exceptions import AzureError, HttpResponseError

    if spec.sweep is not None:
        job, kind = sweep_pipeline(target, run_id, spec, gpus_per_node=gpus_per_node), "sweep"
    else:
        job, kind = command_job(target, run_id, nodes=nodes, gpus_per_node=gpus_per_node), "command"
    validate(job)
    try:
        created = client.jobs.create_or_update(job, experiment_name=EXPERIMENT)
    except HttpResponseError as exc:
        status = getattr(exc, "status_code", None)
        hint = {
            403: "your identity needs a role allowing Microsoft.MachineLearningServices/workspaces/jobs/write "
            "(e.g. AzureML Data Scientist) on the workspace",
            404: f"workspace {target.workspace!r} or cluster {target.compute!r} was not found in resource group "
            f"{target.resource_group}; check the stack outputs",
        }.get(status, "see the message above")
        first = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0][:300]
        raise AmlError(f"submitting run {run_id} to Azure ML failed (HTTP {status}): {first}; {hint}") from exc
    except AzureError as exc:
        raise AmlError(f"submitting run {run_id} to Azure ML failed: {exc}") from exc
    except Exception as exc:  # azure-ai-ml's own MlException / ValidationException (e.g. compute not found)
        if type(exc).__module__.startswith("azure.ai.ml"):
            first = str(exc).strip().splitlines()[0][:500]
            raise AmlError(f"Azure ML refused run {run_id}: {first}; check the stack outputs "
                           f"(workspace {target.workspace}, cluster {target.compute})") from exc
        raise
    status = getattr(created.status, "value", created.status)
    return AmlSubmission(run_id, created.name, str(status), getattr(created, "studio_url", None), kind)


# -- inside the trial and publish steps (run in the trainer image) --------------------------------------------


def trial_overrides(learning_rate: float | None, lora_r: int | None, epochs: float | None) -> dict[str, Any]:
    """The swept values as spec overrides (only those the sweep set)."""
    out: dict[str, Any] = {}
    if learning_rate is not None:
        out["training.learning_rate"] = float(learning_rate)
    if lora_r is not None:
        out["lora.r"] = int(lora_r)
    if epochs is not None:
        out["training.epochs"] = float(epochs)
    return out


def prepare_trial(source: Any, run_id: str, out: Any, overrides: dict[str, Any]) -> str:
    """Copy run ``run_id``'s datasets from the shared store ``source`` into the trial's own store ``out``
    and write a derived run with ``overrides`` applied; returns the trial's run id (``<run>-t<hash>``).

    The spec is validated like any other (a bad value names the key)."""
    import hashlib

    import yaml

    from lorastack.spec import RunSpec, _deep_merge, _expand_dotted
    from lorastack.store import SPEC_FILE, write_bytes_atomic
    from lorastack.trainer import RUN_KEYS, load_run_spec

    _, doc = load_run_spec(source, run_id)
    fields = {k: v for k, v in doc.items() if k not in RUN_KEYS}
    fields["sweep"] = None
    merged = _deep_merge(fields, _expand_dotted(overrides))
    RunSpec.model_validate(merged)  # raises with the offending key
    tag = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    trial_id = f"{run_id[:50]}-t{tag}"
    for sha in doc["dataset_sha256"].values():
        out.put_dataset(source.dataset_path(sha))
    trial_doc = {**merged, "run_id": trial_id, "dataset_sha256": doc["dataset_sha256"]}
    write_bytes_atomic(out.run_dir(trial_id) / SPEC_FILE, yaml.safe_dump(trial_doc, sort_keys=False).encode())
    return trial_id


def log_metric(name: str, value: float) -> bool:
    """Log a metric to the Azure ML run (MLflow, as Azure ML's sweeps read it); False if MLflow is absent."""
    try:
        import mlflow
    except ImportError:
        return False
    mlflow.log_metric(name, value)
    return True
