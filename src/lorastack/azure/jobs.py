"""Training runs on the ACA job: submit (validate, refuse what the job cannot run, upload, start), follow, status.

Submitting a run, in this order:

1. The spec and its datasets are checked and the run is prepared exactly as ``--local`` does
   (:func:`lorastack.trainer.prepare_run`), into a temporary local staging store. A bad spec or dataset fails
   here, before any credential is used or any request is sent. A base model that is a path on this machine is
   refused here too: the job cannot read it, and would only fail after a GPU cold start.
2. The credential is checked, then the job's container memory and the share's free quota are read: data larger
   than either is refused before anything is uploaded.
3. The staged objects are copied onto the Azure Files share (the store the training job mounts), at the same
   relative paths: ``datasets/<sha256>.jsonl`` (skipped when already there: content-addressed),
   ``runs/<run-id>/spec.yaml`` (the same bytes the local path writes), then ``queue/<run-id>`` last. Each file
   is uploaded under a temporary name in its directory and renamed, so the trainer never sees a partial file.
4. One execution of the training job is started **without** a template override (an override replaces the
   whole container template and may drop the store's volume mount; ACA#909). The job's entrypoint,
   ``lorastack train --store /mnt/store --run next``, claims the oldest queued run.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorastack.azure.credentials import Azure, CloudError, explain
from lorastack.azure.share import ShareStore, mib
from lorastack.store import SPEC_FILE, STATUS_FILE, Store, claim_key, dataset_key, queue_key, run_key

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3  # the run stopped itself at its time budget: submit again to continue

WAIT_POLL_SECONDS = 15.0
RUN_PHASES_DONE = ("succeeded", "failed", "stopped")
EXECUTION_STATES_DONE = ("Succeeded", "Failed", "Stopped")  # "Degraded" may still be running
STORE_MOUNT_PATH = "/mnt/store"  # provisioning.contract.STORE_MOUNT_PATH: where the job sees the share
# The trainer pre-tokenizes every example into Python lists (input_ids + labels: ~2 list slots and int objects per
# token, a token per ~4 bytes of JSONL): about 24 bytes of memory per byte of data. Half the container's memory is
# left for the model, CUDA host buffers and the data loader.
MEMORY_BYTES_PER_DATA_BYTE = 24
DATA_MEMORY_SHARE = 0.5


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
    base_model: str = ""

    @property
    def data_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.datasets.values())


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
        base_model=str(doc.get("base_model") or ""),
    )


_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def local_base_model_problem(base_model: str, spec_path: str | os.PathLike[str]) -> str | None:
    """Why the cloud job cannot load ``base_model`` (a path on this machine), or None.

    Hub ids (``org/name``) and paths on the store mount (``/mnt/store/...``) are fine; anything that is a directory
    here, or is written as a path (``/``, ``./``, ``../``, ``~``, ``C:\\``), is not: the job would fail only after
    a GPU cold start.
    """
    bm = base_model.strip()
    if bm == STORE_MOUNT_PATH or bm.startswith(STORE_MOUNT_PATH + "/"):
        return None
    looks_like_path = bm.startswith(("/", "./", "../", "~", ".\\", "..\\")) or bool(_WINDOWS_PATH.match(bm))
    exists_here = Path(bm).expanduser().exists() or (Path(spec_path).parent / bm).exists()
    if not (looks_like_path or exists_here):
        return None
    return (
        f"{spec_path}: base_model {base_model!r} is a path on this machine; the Azure job cannot read it and "
        "would fail after a GPU cold start. Use a Hugging Face model id (e.g. microsoft/Phi-3-mini-4k-instruct, "
        "with base_revision pinned), or copy the model onto the share under models/ and set base_model to "
        f"{STORE_MOUNT_PATH}/models/<dir>; or train here with --local."
    )


def _memory_bytes(memory: str) -> int | None:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(Gi|G|Mi|M|Ti|T)?\s*", memory or "")
    if not m:
        return None
    unit = {"Gi": 2**30, "G": 10**9, "Mi": 2**20, "M": 10**6, "Ti": 2**40, "T": 10**12, None: 1}[m.group(2)]
    return int(float(m.group(1)) * unit)


def job_memory(azure: Azure) -> tuple[str, int] | None:
    """(memory as written, bytes) of the training job's container (Jobs - Get), None if not set."""
    from azure.core.exceptions import AzureError

    o = azure.outputs
    try:
        job = azure.apps().jobs.get(o.resource_group, o.job_name)
    except AzureError as exc:
        raise explain(exc, o, f"reading job {o.job_name}") from exc
    containers = getattr(getattr(job, "template", None), "containers", None) or []
    for c in containers:
        memory = getattr(getattr(c, "resources", None), "memory", None)
        if memory and _memory_bytes(memory):
            return str(memory), int(_memory_bytes(memory) or 0)
    return None


def capacity_problem(azure: Azure, share: ShareStore, staged: StagedRun) -> tuple[str | None, set[str]]:
    """(why the job cannot read this run's data, or None; datasets already on the share).

    Checks the data against what the job can hold in memory while it tokenizes, and what is still to upload
    against the share's free quota, before anything is uploaded.
    """
    present = {
        sha for sha, local in staged.datasets.items() if share.size(dataset_key(sha)) == local.stat().st_size
    }
    total = staged.data_bytes
    memory = job_memory(azure)
    if memory is not None:
        limit = int(memory[1] * DATA_MEMORY_SHARE / MEMORY_BYTES_PER_DATA_BYTE)
        if total > limit:
            return (
                (f"run {staged.run_id}: its data ({mib(total)}) is more than job {azure.outputs.job_name} can "
                f"tokenize in its {memory[0]} of memory (about {mib(limit)}: the trainer holds every example's tokens "
                "in memory). Split the data into smaller runs, sample it down, or give the job a larger GPU "
                "profile (lorastack:training.gpuProfile, then `pulumi up`)."),
                present,
            )
    to_upload = sum(p.stat().st_size for sha, p in staged.datasets.items() if sha not in present)
    if to_upload:
        free = share.free_bytes()
        if free is not None and to_upload > free:
            return (
                (f"run {staged.run_id}: {mib(to_upload)} of data to upload, but share {azure.outputs.share_name} has "
                f"only {mib(max(free, 0))} left under its quota. Raise lorastack:store.quotaGiB and `pulumi up`, "
                "or delete old runs (`lorastack runs rm RUN_ID`)."),
                present,
            )
    return None, present


def upload_run(
    share: ShareStore,
    staged: StagedRun,
    echo: Callable[[str], None] = lambda s: None,
    enqueue: bool = True,
    present: set[str] | None = None,
) -> Submission:
    """Copy a staged run onto the share: datasets (once, by sha256), spec.yaml, then the queue entry last
    (``enqueue=False``: it is queued already and keeps its place). ``present``: datasets known to be there."""
    sub = Submission(staged.run_id)
    for sha, local in staged.datasets.items():
        remote = dataset_key(sha)
        share.ensure_dir("datasets")
        known = sha in present if present is not None else share.size(remote) == local.stat().st_size
        if known:
            sub.skipped.append(remote)
            continue
        echo(f"uploading dataset ({mib(local.stat().st_size)}) to {remote}")
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
    run is staged and its base model checked, so bad input fails before any credential or client exists."""
    with tempfile.TemporaryDirectory(prefix="lorastack-submit-") as tmp:
        staged = stage_run(Path(tmp) / "store", spec_path, overrides)
        problem = local_base_model_problem(staged.base_model, spec_path)
        if problem:
            raise CloudError(problem)
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
        problem, present = capacity_problem(azure, share, staged)
        if problem:
            raise CloudError(problem + " Nothing was uploaded.")
        sub = upload_run(share, staged, echo, enqueue=not state.queued, present=present)
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


def run_exit_code(state: RunState, note: Callable[[str], None]) -> int:
    """The exit code for a run that has ended (succeeded 0, failed 1, stopped at its budget 3)."""
    if state.phase == "succeeded":
        return EXIT_OK
    if state.phase == "stopped":
        note("the run stopped at its time budget; submit the same spec again to continue it")
        return EXIT_STOPPED
    return EXIT_FAILED


def follow_run(
    azure: Azure,
    run_id: str,
    started: str | None,
    echo_log: Callable[[str], None],
    note: Callable[[str], None],
    poll_seconds: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``finetune --wait``: stream the live log of the execution training the run until the run ends.

    The execution followed is the one named in claims/<run-id>, else the one this submission started (with several
    runs queued it may take another run; then the one that claims ours is followed next).
    """
    from lorastack.azure.logs import follow_execution

    share = azure.share()
    followed: set[str] = set()
    while True:
        state = read_run(share, run_id)
        if state.phase in RUN_PHASES_DONE:
            note(describe(state))
            return run_exit_code(state, note)
        execution = state.claimed_by or started
        if execution is None:
            note(f"run {run_id} is {state.phase} and no execution is watching it; start one with "
                 f"`az containerapp job start -n {azure.outputs.job_name} -g {azure.outputs.resource_group}`")
            return EXIT_FAILED
        if execution in followed:
            state = read_run(share, run_id)  # the trainer writes its final status before it exits
            if state.phase in RUN_PHASES_DONE:
                continue
            if state.claimed_by and state.claimed_by not in followed:
                continue
            ex_status = execution_state(azure, execution)
            note(f"execution {execution} ended ({ex_status}) while the run was {state.phase}; "
                 f"see `lorastack logs {execution}`")
            return EXIT_FAILED
        follow_execution(azure, execution, echo_log, note, follow=True, poll_s=poll_seconds, sleep=sleep)
        followed.add(execution)
