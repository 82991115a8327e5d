"""Azure operations: ``lorastack finetune JOB.yaml`` (no ``--local``) and ``lorastack status``.

Submitting a run, in this order:

1. The spec and its datasets are checked and the run is prepared exactly as ``--local`` does
   (:func:`lorastack.trainer.prepare_run`), into a temporary local staging store. A bad spec or dataset fails
   here, before any credential is used or any request is sent.
2. The staged objects are copied onto the Azure Files share (the store the training job mounts), at the same
   relative paths: ``datasets/<sha256>.jsonl`` (skipped when already there: content-addressed),
   ``runs/<run-id>/spec.yaml`` (the same bytes the local path writes), then ``queue/<run-id>`` last. Each file
   is uploaded under a temporary name in its directory and renamed, so the trainer never sees a partial file.
3. One execution of the training job is started **without** a template override (an override replaces the
   whole container template and may drop the store's volume mount; ACA#909). The job's entrypoint,
   ``lorastack train --store /mnt/store --run next``, claims the oldest queued run.

Storage access uses Microsoft Entra ID (``DefaultAzureCredential``, ``token_intent="backup"``), never the account
key: the signed-in identity needs the **Storage File Data Privileged Contributor** role on the storage account,
and a role allowing ``Microsoft.App/jobs/start/action`` and ``.../jobs/executions/read`` on the job (e.g.
Contributor on the resource group). The Azure SDKs are imported inside functions: ``lorastack --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorastack.store import SPEC_FILE, STATUS_FILE, Store, claim_key, dataset_key, queue_key, run_key

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3  # the run stopped itself at its time budget: submit again to continue

STORAGE_ROLE = "Storage File Data Privileged Contributor"
JOB_ROLE_HINT = (
    "a role allowing Microsoft.App/jobs/start/action and Microsoft.App/jobs/executions/read on the job "
    "(e.g. Contributor on the resource group)"
)
# ARM jobs/start answers 202 + Location; the execution exists within seconds, so poll briefly, not ARM's 30 s.
START_POLL_SECONDS = 2.0
WAIT_POLL_SECONDS = 15.0
_TMP_PREFIX = ".tmp-"  # the store's temporary-sibling prefix: never a valid run id or dataset name
RUN_PHASES_DONE = ("succeeded", "failed", "stopped")
EXECUTION_STATES_DONE = ("Succeeded", "Failed", "Stopped")  # "Degraded" may still be running


class CloudError(Exception):
    """An Azure operation cannot be done; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# Stack outputs: where the share and the job are
# ---------------------------------------------------------------------------------------------------
# field -> (pulumi stack output, AI Toolkit finetuning.config.json key, env vars, what it is)
OUTPUT_SOURCES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "subscription_id": (
        "subscriptionId",
        "SUBSCRIPTION_ID",
        ("LORASTACK_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID"),
        "subscription id",
    ),
    "resource_group": (
        "resourceGroupName",
        "RESOURCE_GROUP_NAME",
        ("LORASTACK_RESOURCE_GROUP",),
        "resource group of the job",
    ),
    "job_name": ("acaJobName", "ACA_JOB_NAME", ("LORASTACK_JOB_NAME",), "training job name"),
    "storage_account": (
        "storageAccountName",
        "STORAGE_ACCOUNT_NAME",
        ("LORASTACK_STORAGE_ACCOUNT",),
        "storage account of the store",
    ),
    "share_name": (
        "fileShareName",
        "FILE_SHARE_NAME",
        ("LORASTACK_SHARE_NAME",),
        "file share holding the store",
    ),
}
OUTPUTS_ENV = "LORASTACK_OUTPUTS"
HOW_TO_GET_OUTPUTS = (
    "pass --outputs FILE, written with `pulumi stack output --json --show-secrets=false --stack <env> > FILE` "
    f"(or set ${OUTPUTS_ENV} to that file)"
)


class StackOutputs(BaseModel):
    """What the CLI needs from a provisioned stack (typed; validated once, here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subscription_id: str = Field(pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
    resource_group: str = Field(pattern=r"^[-\w.()]{1,90}$")
    job_name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
    storage_account: str = Field(pattern=r"^[a-z0-9]{3,24}$")
    share_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

    @property
    def account_url(self) -> str:
        return f"https://{self.storage_account}.file.core.windows.net"

    @property
    def storage_scope(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Storage/storageAccounts/{self.storage_account}"
        )


def load_outputs(
    path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> StackOutputs:
    """Read the stack outputs from ``path`` (``pulumi stack output --json``, or the AI Toolkit's
    finetuning.config.json), else ``$LORASTACK_OUTPUTS``; keys missing there come from environment variables.

    Raises CloudError naming each missing or malformed key and how to get it.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(OUTPUTS_ENV) or None
    raw: dict[str, Any] = {}
    where = "the environment"
    if path:
        where = str(path)
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise CloudError(f"{path}: no such file; {HOW_TO_GET_OUTPUTS}") from None
        except json.JSONDecodeError as exc:
            raise CloudError(
                f"{path}: not JSON ({exc.msg} at line {exc.lineno}); {HOW_TO_GET_OUTPUTS}"
            ) from None
        if not isinstance(raw, dict):
            raise CloudError(f"{path}: expected a JSON object of stack outputs; {HOW_TO_GET_OUTPUTS}")
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for fld, (output, toolkit_key, env_vars, what) in OUTPUT_SOURCES.items():
        value: Any = None
        for key in (output, toolkit_key):
            if raw.get(key) not in (None, ""):
                value, origin[fld] = raw[key], f"{where}: {key}"
                break
        if value is None:
            for var in env_vars:
                if environ.get(var):
                    value, origin[fld] = environ[var], f"${var}"
                    break
        if value is None:
            problems.append(
                f"missing stack output {output!r} ({what}): not in {where} and ${env_vars[0]} is not set"
            )
        elif value == "[secret]":
            problems.append(
                f"{where}: {output}: is shown as [secret]; it is not a secret, re-export the outputs"
            )
        else:
            values[fld] = str(value)
    if problems:
        raise CloudError(
            "; ".join(problems) + f". To fix: {HOW_TO_GET_OUTPUTS}, or set the environment variables."
        )
    try:
        return StackOutputs(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            fld = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(
                f"{origin.get(fld, fld)}: {values.get(fld)!r} is not a valid {OUTPUT_SOURCES[fld][3]}"
            )
        raise CloudError("; ".join(lines) + f". {HOW_TO_GET_OUTPUTS}") from None


# ---------------------------------------------------------------------------------------------------
# Connections and error messages
# ---------------------------------------------------------------------------------------------------
@dataclass
class Azure:
    """A credential plus the keyword arguments every SDK client is built with (tests pass ``transport=``)."""

    outputs: StackOutputs
    credential: Any = None
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    start_poll_seconds: float = START_POLL_SECONDS

    def __post_init__(self) -> None:
        if self.credential is None:
            from azure.identity import DefaultAzureCredential

            self.credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)

    def share(self) -> ShareStore:
        return ShareStore(self)

    def apps(self) -> Any:
        from azure.mgmt.appcontainers import ContainerAppsAPIClient

        return ContainerAppsAPIClient(self.credential, self.outputs.subscription_id, **self.client_kwargs)


def _error_code(exc: Any) -> str:
    code = getattr(exc, "error_code", None)
    if not code and getattr(exc, "error", None) is not None:
        code = getattr(exc.error, "code", None)
    response = getattr(exc, "response", None)
    if not code and response is not None:
        code = response.headers.get("x-ms-error-code")
    return str(getattr(code, "value", code) or "")  # the storage SDK maps known codes to a str Enum


def explain(exc: BaseException, outputs: StackOutputs, doing: str) -> CloudError:
    """A CloudError saying what failed and what to do, for an Azure SDK exception raised while ``doing``."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    o = outputs
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)
    code = _error_code(exc)
    on_share = "share" in doing or "store" in doing
    if isinstance(exc, ClientAuthenticationError) and status is None:
        return CloudError(
            f"{doing}: no Azure credential ({str(exc).splitlines()[0]}); sign in with `az login` "
            "(or set AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_FEDERATED_TOKEN_FILE in a pipeline)"
        )
    if isinstance(exc, ServiceRequestError):
        host = o.account_url if on_share else "https://management.azure.com"
        return CloudError(f"{doing}: cannot reach {host} ({exc}); check the network and the stack outputs")
    if not isinstance(exc, HttpResponseError):
        return CloudError(f"{doing}: {type(exc).__name__}: {exc}")
    if on_share and status == 403:
        network = (
            " The account may also refuse your network (code AuthorizationFailure): allow your IP in its "
            "firewall, or run from the stack's VNet."
            if code == "AuthorizationFailure"
            else ""
        )
        return CloudError(
            f"{doing}: the storage account {o.storage_account} refused the request (403 {code}). Your identity "
            f"needs the role '{STORAGE_ROLE}' on it: az role assignment create --role '{STORAGE_ROLE}' "
            f"--assignee <your user or app id> --scope {o.storage_scope} "
            f"(role assignments take a few minutes to apply).{network}"
        )
    if on_share and status == 404 and code == "ShareNotFound":
        return CloudError(
            f"{doing}: the share {o.share_name!r} does not exist in storage account {o.storage_account}; "
            "check that the outputs file belongs to this stack"
        )
    if on_share and status == 400 and "protocol" in str(exc).lower():
        return CloudError(
            f"{doing}: the share {o.share_name!r} does not accept REST access (an NFS share?); "
            "submit from a machine that mounts the share, with `--local --store <mount>` and the job started by hand"
        )
    if not on_share and status == 403:
        return CloudError(
            f"{doing}: Azure refused ({code or 403}) on job {o.job_name!r} in resource group {o.resource_group}: "
            f"your identity needs {JOB_ROLE_HINT}"
        )
    if not on_share and status == 404:
        return CloudError(
            f"{doing}: job {o.job_name!r} was not found in resource group {o.resource_group} of subscription "
            f"{o.subscription_id} ({code or 404}); check the stack outputs (`pulumi stack output acaJobName`)"
        )
    first = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0][:300]
    return CloudError(f"{doing}: HTTP {status} {code}: {first}")


# ---------------------------------------------------------------------------------------------------
# The store on the share
# ---------------------------------------------------------------------------------------------------
class ShareStore:
    """The store on the Azure Files share, addressed by the same relative paths as :class:`lorastack.store.Store`."""

    def __init__(self, azure: Azure):
        from azure.storage.fileshare import ShareClient

        self.outputs = azure.outputs
        self.client = ShareClient(
            account_url=azure.outputs.account_url,
            share_name=azure.outputs.share_name,
            credential=azure.credential,
            token_intent="backup",  # Entra ID on Azure Files REST: acts with the role's data permissions
            **azure.client_kwargs,
        )
        self._dirs: set[str] = set()

    def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import AzureError

        try:
            return fn(*args, **kwargs)
        except AzureError as exc:
            raise explain(exc, self.outputs, f"{doing} on share {self.outputs.share_name}") from exc

    def ensure_dir(self, path: str) -> None:
        """Create ``path`` and its parents (Azure Files has no recursive create); existing ones are fine."""
        from azure.core.exceptions import ResourceExistsError

        parts = [p for p in path.strip("/").split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self._dirs:
                continue
            try:
                self._call(
                    f"creating directory {sub}", self.client.get_directory_client(sub).create_directory
                )
            except CloudError as err:
                if not isinstance(err.__cause__, ResourceExistsError):
                    raise
            self._dirs.add(sub)

    def size(self, path: str) -> int | None:
        """Size of the file at ``path``, or None when there is none (Get File Properties)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            props = self._call(f"checking {path}", self.client.get_file_client(path).get_file_properties)
        except CloudError as err:
            if isinstance(err.__cause__, ResourceNotFoundError):
                return None
            raise
        return int(props.size)

    def read_bytes(self, path: str) -> bytes | None:
        """Content of ``path``, or None when it does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            downloader = self._call(f"reading {path}", self.client.get_file_client(path).download_file)
            return self._call(f"reading {path}", downloader.readall)
        except CloudError as err:
            if isinstance(err.__cause__, ResourceNotFoundError):
                return None
            raise

    def read_json(self, path: str) -> Any:
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise CloudError(
                f"{path} on share {self.outputs.share_name}: not valid JSON ({exc.msg})"
            ) from None

    def list_dir(self, path: str) -> list[tuple[str, bool]]:
        """(name, is_directory) of the entries of ``path``; empty when it does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._call(
                f"listing {path}",
                lambda: [
                    (e["name"], bool(e["is_directory"]))
                    for e in self.client.get_directory_client(path).list_directories_and_files()
                ],
            )
        except CloudError as err:
            if isinstance(err.__cause__, ResourceNotFoundError):
                return []
            raise

    def delete(self, path: str) -> None:
        """Delete a file; one already gone is fine."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._call(f"deleting {path}", self.client.get_file_client(path).delete_file)
        except CloudError as err:
            if not isinstance(err.__cause__, ResourceNotFoundError):
                raise

    def put_atomic(self, path: str, source: bytes | Path, echo: Callable[[str], None] | None = None) -> None:
        """Upload to a temporary sibling, then rename over ``path``: readers see the old file or the new one."""
        parent, _, name = path.rpartition("/")
        self.ensure_dir(parent)
        tmp = f"{parent}/{_TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}" if parent else f"{_TMP_PREFIX}{name}"
        tmp_client = self.client.get_file_client(tmp)
        big = isinstance(source, Path) and source.stat().st_size >= 8 * 2**20
        hook = _progress_hook(path, echo) if echo is not None and big else None
        try:
            if isinstance(source, Path):
                with open(source, "rb") as fh:
                    self._call(
                        f"uploading {path}",
                        tmp_client.upload_file,
                        fh,
                        length=source.stat().st_size,
                        max_concurrency=4,  # 4 MiB ranges in parallel: large datasets upload faster
                        progress_hook=hook,
                    )
            else:
                self._call(f"uploading {path}", tmp_client.upload_file, source, length=len(source))
            self._call(f"renaming {tmp} to {path}", tmp_client.rename_file, path, overwrite=True)
        except BaseException:
            from azure.core.exceptions import AzureError

            try:
                tmp_client.delete_file()
            except AzureError:
                pass
            raise


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _progress_hook(path: str, echo: Callable[[str], None]) -> Callable[[int, int | None], None]:
    last = [0.0]

    def hook(done: int, total: int | None) -> None:
        now = time.monotonic()
        if total and (done >= total or now - last[0] > 2.0):
            last[0] = now
            echo(f"  {path}: {_mib(done)} of {_mib(total)} ({100 * done // total}%)")

    return hook


# ---------------------------------------------------------------------------------------------------
# Submitting a run
# ---------------------------------------------------------------------------------------------------
@dataclass
class Submission:
    """What ``finetune`` did in the cloud."""

    run_id: str
    execution: str | None = None
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    already_succeeded: dict[str, Any] | None = None
    already_running: str | None = None  # the execution training it now
    released_claim: str | None = None  # the ended execution whose claim was released for this resubmission


@dataclass
class StagedRun:
    """A run prepared in a local staging store: the exact objects to copy to the share."""

    run_id: str
    spec_yaml: bytes
    queue_entry: bytes
    datasets: dict[str, Path]  # sha256 -> staged file


def stage_run(staging_root: Path, spec_path: str | os.PathLike[str], overrides: Any = None) -> StagedRun:
    """Prepare the run into a local store at ``staging_root`` with the trainer's own code (no network).

    Raises the trainer's DatasetError / SpecError for bad input, before anything is uploaded.
    """
    import yaml

    from lorastack.trainer import prepare_run

    staging = Store(staging_root).init()
    run_id = prepare_run(staging, spec_path, overrides)
    spec_yaml = (staging.root / run_key(run_id, SPEC_FILE)).read_bytes()
    doc = yaml.safe_load(spec_yaml) or {}
    shas = sorted(set((doc.get("dataset_sha256") or {}).values()))
    staging.enqueue_run(run_id)
    return StagedRun(
        run_id=run_id,
        spec_yaml=spec_yaml,
        queue_entry=(staging.root / queue_key(run_id)).read_bytes(),
        datasets={sha: staging.root / dataset_key(sha) for sha in shas},
    )


def upload_run(
    share: ShareStore, staged: StagedRun, echo: Callable[[str], None] = lambda s: None, enqueue: bool = True
) -> Submission:
    """Copy a staged run onto the share: datasets (once, by sha256), spec.yaml, then the queue entry last
    (``enqueue=False``: it is queued already and keeps its place)."""
    sub = Submission(staged.run_id)
    for sha, local in staged.datasets.items():
        remote = dataset_key(sha)
        share.ensure_dir("datasets")
        if share.size(remote) == local.stat().st_size:
            sub.skipped.append(remote)
            continue
        echo(f"uploading dataset ({_mib(local.stat().st_size)}) to {remote}")
        share.put_atomic(remote, local, echo=echo)
        sub.uploaded.append(remote)
    spec_remote = run_key(staged.run_id, SPEC_FILE)
    share.put_atomic(spec_remote, staged.spec_yaml)
    sub.uploaded.append(spec_remote)
    if enqueue:
        queue_remote = queue_key(staged.run_id)
        share.put_atomic(queue_remote, staged.queue_entry)
        sub.uploaded.append(queue_remote)
    return sub


def start_job(azure: Azure) -> str:
    """Start one execution of the training job with its own template (no override); return its name."""
    from azure.core.exceptions import AzureError

    o = azure.outputs
    try:
        poller = azure.apps().jobs.begin_start(
            o.resource_group, o.job_name, polling_interval=azure.start_poll_seconds
        )
        execution = poller.result()
    except AzureError as exc:
        raise explain(exc, o, f"starting job {o.job_name}") from exc
    name = getattr(execution, "name", None)
    if not name:
        raise CloudError(f"starting job {o.job_name}: Azure answered without an execution name")
    return str(name)


def submit_run(
    spec_path: str | os.PathLike[str],
    overrides: Any,
    azure_factory: Callable[[], Azure],
    echo: Callable[[str], None] = lambda s: None,
) -> Submission:
    """Validate and stage locally, then upload and start the job. ``azure_factory`` is called only after the
    run is staged, so bad input fails before any credential or client exists."""
    with tempfile.TemporaryDirectory(prefix="lorastack-submit-") as tmp:
        staged = stage_run(Path(tmp) / "store", spec_path, overrides)
        echo(f"run {staged.run_id}: spec and data are valid")
        azure = azure_factory()
        share = azure.share()
        state = read_run(share, staged.run_id)
        if state.phase == "succeeded":
            return Submission(staged.run_id, already_succeeded=state.status)
        released = None
        if state.claimed_by:
            ex_status = execution_state(azure, state.claimed_by)
            if ex_status is not None and ex_status not in EXECUTION_STATES_DONE:
                return Submission(staged.run_id, execution=state.claimed_by, already_running=ex_status)
            # Its execution is over (a stopped or failed run submitted again): release the claim so the next
            # execution may take the run; it resumes from the run's last complete checkpoint.
            share.delete(claim_key(staged.run_id))
            released = state.claimed_by
        sub = upload_run(share, staged, echo, enqueue=not state.queued)
        sub.released_claim = released
    try:
        sub.execution = start_job(azure)
    except CloudError as exc:
        o = azure.outputs
        raise CloudError(
            f"run {sub.run_id} is queued on share {o.share_name}, but no job execution was started: {exc}. "
            f"Once fixed, start one with `az containerapp job start -n {o.job_name} -g {o.resource_group}` "
            "(it trains the oldest queued run), or submit again."
        ) from exc
    return sub


# ---------------------------------------------------------------------------------------------------
# Following a run
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """A run as seen on the share (and, once claimed, its job execution)."""

    run_id: str
    queued: bool
    claimed_by: str | None
    status: dict[str, Any] | None
    exists: bool

    @property
    def phase(self) -> str:
        if self.status and self.status.get("phase"):
            return str(self.status["phase"])
        if self.queued:
            return "queued"
        if self.claimed_by:
            return "starting"
        return "unknown"


def read_run(share: ShareStore, run_id: str) -> RunState:
    """Read runs/<id>/status.json, queue/<id> and claims/<id> from the share."""
    from lorastack.store import StoreError, check_name

    try:
        check_name(run_id, "run id")
    except StoreError as exc:
        raise CloudError(str(exc)) from None
    status = share.read_json(run_key(run_id, STATUS_FILE))
    claim = share.read_bytes(claim_key(run_id))
    queued = share.size(queue_key(run_id)) is not None
    exists = (
        status is not None
        or queued
        or claim is not None
        or share.size(run_key(run_id, SPEC_FILE)) is not None
    )
    return RunState(
        run_id, queued, claim.decode("utf-8", "replace").strip() if claim else None, status, exists
    )


def execution_state(azure: Azure, execution: str) -> str | None:
    """The job execution's status (Running, Succeeded, Failed, ...), or None if Azure does not know it."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    o = azure.outputs
    try:
        ex = azure.apps().job_execution(o.resource_group, o.job_name, execution)
    except ResourceNotFoundError:
        return None
    except AzureError as exc:
        raise explain(exc, o, f"reading execution {execution} of job {o.job_name}") from exc
    props = getattr(ex, "properties", None)
    status = getattr(props, "status", None) if props is not None else None
    return str(getattr(status, "value", status)) if status else None


def describe(state: RunState, execution_status: str | None = None) -> str:
    """One progress line: phase, step, loss, throughput, adapter or error."""
    s = state.status or {}
    parts = [f"{state.run_id}: {state.phase}"]
    if state.claimed_by:
        parts.append(f"execution {state.claimed_by}" + (f" ({execution_status})" if execution_status else ""))
    if s.get("step") is not None:
        parts.append(f"step {s['step']}" + (f"/{s['max_steps']}" if s.get("max_steps") else ""))
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("tokens_per_s", "tok/s", "{:.0f}")):
        if isinstance(s.get(key), (int, float)):
            parts.append(f"{label} {fmt.format(s[key])}")
    if s.get("adapter"):
        parts.append(f"adapter {s['adapter']}")
    if s.get("message") and state.phase not in RUN_PHASES_DONE:
        parts.append(str(s["message"]))
    if s.get("error"):
        parts.append(f"error: {s['error']}")
    return " | ".join(parts)


def wait_for_run(
    azure: Azure,
    run_id: str,
    started: str | None,
    echo: Callable[[str], None],
    poll_seconds: float = WAIT_POLL_SECONDS,
    max_polls: int | None = None,
) -> int:
    """Poll the run's status.json and its job execution until the run ends; return an exit code.

    The execution that trains the run is the one named in claims/<run-id> (with several runs queued, the
    execution this command started may take another one); until the run is claimed, ``started`` is watched.
    """
    share = azure.share()
    last = ""
    polls = 0
    while True:
        state = read_run(share, run_id)
        watched = state.claimed_by or started
        ex_status = execution_state(azure, watched) if watched else None
        line = describe(state, ex_status if state.claimed_by else None)
        if not state.claimed_by and started:
            line += f" | execution {started} ({ex_status or 'starting'})"
        if line != last:
            echo(line)
            last = line
        if state.phase == "succeeded":
            return EXIT_OK
        if state.phase == "failed":
            return EXIT_FAILED
        if state.phase == "stopped":
            echo("the run stopped at its time budget; submit the same spec again to continue it")
            return EXIT_STOPPED
        if ex_status in EXECUTION_STATES_DONE and (state.claimed_by or state.queued):
            # the trainer writes its final status before it exits: read once more before calling it a failure
            state = read_run(share, run_id)
            if state.phase in RUN_PHASES_DONE:
                continue
            echo(f"execution {watched} ended ({ex_status}) while the run was {state.phase}; see the logs")
            return EXIT_FAILED
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return EXIT_FAILED
        time.sleep(poll_seconds)
