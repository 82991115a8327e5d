"""The QLoRA trainer: ``lorastack finetune JOB.yaml --local`` and ``lorastack train --store DIR --run ID``.

One run, start to finish:

1. ``finetune`` loads the spec and checks every dataset *before* anything heavy is imported or loaded (a
   bad file fails in well under a second, naming ``file:line``), copies the datasets into the store
   (content-addressed), and writes ``runs/<run-id>/spec.yaml`` (the resolved spec plus the datasets'
   sha256). The run id is ``<name>-<fingerprint[:12]>``. Then it trains in-process, exactly as ``train``
   (the training image's entrypoint) does from that spec.yaml.
2. Tokenizer first: the datasets are re-checked against the base model's tokenizer and context length,
   then turned into ``input_ids`` + ``labels`` by :func:`lorastack.chat.encode_chat` (the model's own
   chat template; loss on assistant tokens only, end-of-turn included, ``weight: 0`` turns excluded).
3. The base model is loaded in 4-bit NF4 with double quantization (bitsandbytes), prepared for k-bit
   training with non-reentrant gradient checkpointing, and wrapped in a LoRA adapter (PEFT).
4. TRL's ``SFTTrainer`` trains on the pre-tokenized data (TRL keeps a ``labels`` column as is). With
   ``packing``, examples are packed best-fit-decreasing into rows of ``max_seq_len`` (:func:`pack_rows`);
   :class:`PackedCollator` restarts ``position_ids`` at every example and passes no attention mask, from
   which transformers builds a block-diagonal causal mask per row, so examples never attend to each other.
   (TRL's own padding-free packing flattens the whole micro-batch into one row, which under SDPA costs
   (batch x max_len)^2 attention instead of batch x max_len^2.)
   ``lorastack train --run next`` claims the oldest run queued on the store (cloud submissions).
5. Preemption safety: checkpoints every ``save_every_minutes`` and on SIGTERM/SIGINT (the signal handler
   only sets a flag; a callback saves and stops at the next step end). A checkpoint is trusted only once
   its ``COMPLETE`` marker is written, after the checkpoint is whole; rotation (``save_total_limit``)
   deletes old checkpoints only after that. On start, the run resumes from its newest complete
   checkpoint, and refuses to if the checkpoint was trained from a different spec or data. The run
   stops itself (checkpoint, status "stopped: time budget") before ``time_budget`` runs out.
6. The adapter (PEFT files, tokenizer files, chat template, manifest) is published atomically with
   :meth:`Store.publish_adapter`; optionally a 16-bit merged model goes to ``runs/<id>/merged/``.

``runs/<id>/status.json`` and ``runs/<id>/results.csv`` are kept current throughout (see progress.py).

torch, transformers, peft and trl are imported inside functions: validating a bad job file must stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorastack.progress import RunReporter, utc_now
from lorastack.store import COMPLETE, Store, StoreError, open_store, write_bytes_atomic, write_json_atomic

log = logging.getLogger("lorastack.trainer")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIME_BUDGET = 3  # stopped itself before the time budget ran out; rerun to continue
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the replica was asked to stop; rerun (a job retry) resumes

SPEC_FILE = "spec.yaml"
NEXT_RUN = "next"  # `lorastack train --run next`: claim the oldest run queued on the store
# Written into every checkpoint: what it was trained from, so a resume with other settings is refused.
IDENTITY_FILE = "lorastack-run.json"
# Extra keys lorastack adds to the resolved spec in runs/<id>/spec.yaml.
RUN_KEYS = ("run_id", "dataset_sha256")

# Dense bf16/fp16 peak FLOP/s per GPU (vendor datasheets, without sparsity), for MFU in the log.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


class TrainerError(Exception):
    """A run cannot start or continue; the message says why and what to do."""


class DatasetError(TrainerError):
    """A dataset failed validation; the message lists ``file:line: code: message`` entries."""


# ---------------------------------------------------------------------------------------------------
# CLI handlers
# ---------------------------------------------------------------------------------------------------
def finetune_command(args: argparse.Namespace) -> int:
    """``lorastack finetune JOB.yaml --local``: validate, put the data in the store, train, publish."""
    started = time.monotonic()
    _setup_logging()
    if not args.local:
        from lorastack.cloud import submit_command

        return submit_command(args)
    store = open_store(args.store).init()
    try:
        from lorastack.spec import spec_overrides_from_args

        run_id = prepare_run(store, args.spec, spec_overrides_from_args(args))
    except TrainerError as exc:
        print(f"lorastack finetune: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # spec errors from lorastack.spec carry their own file/key message
        if _is_user_error(exc):
            print(f"lorastack finetune: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(f"run {run_id} (store {store.root})", file=sys.stderr)
    outcome = run_training(store, run_id, started=started, interactive=True)
    if outcome.phase == "succeeded":
        print(f"adapter {outcome.adapter_ref} published in {store.adapters_dir}")
    elif outcome.phase in ("preempted", "stopped"):
        print(f"run {run_id} {outcome.phase} with a checkpoint; run the same command again to resume")
    else:
        print(f"run {run_id} failed; see {store.run_dir(run_id) / 'status.json'}", file=sys.stderr)
    return outcome.exit_code


def train_command(args: argparse.Namespace) -> int:
    """``lorastack train --store DIR --run RUN_ID``: the training image's entrypoint."""
    started = time.monotonic()
    _setup_logging()
    store = open_store(args.store)
    args.run = args.run or os.environ.get("LORASTACK_RUN_ID") or NEXT_RUN
    if args.run == NEXT_RUN:
        # Cloud submissions are queued on the store (lorastack.cloud); the job execution claims the oldest.
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
    return run_training(store, args.run, started=started, interactive=sys.stderr.isatty()).exit_code


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s lorastack: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _is_user_error(exc: Exception) -> bool:
    """Errors that describe bad input (spec file, overrides), printed without a traceback."""
    from lorastack.spec import SpecError

    return isinstance(exc, (SpecError, StoreError, FileNotFoundError))


# ---------------------------------------------------------------------------------------------------
# Preparing a run: spec + datasets into the store
# ---------------------------------------------------------------------------------------------------
def run_id_for(spec: Any) -> str:
    """``<name>-<fingerprint[:12]>``: the same spec and data always map to the same run (and resume it)."""
    return spec.run_id()


def _dataset_paths(spec: Any) -> dict[str, Path]:
    """{"training": path, "validation": path} for the datasets the spec names (validation optional)."""
    return {role: Path(p) for role, p in spec.data_files().items()}


def validate_datasets(
    paths: dict[str, Path], tokenizer: Any = None, max_seq_len: int | None = None
) -> list[str]:
    """Run the data checks (lorastack.data) on each file; raise DatasetError listing every error.

    Without a tokenizer only the structure is checked (fast, before anything is loaded); with one,
    token counts and over-long examples too. Returns the warnings as text.
    """
    from lorastack.data import validate_file

    errors: list[str] = []
    warnings_: list[str] = []
    for role, path in paths.items():
        report = validate_file(
            path,
            tokenizer=tokenizer,
            max_seq_len=max_seq_len,
            purpose="validation" if role == "validation" else "train",
        )
        errors += [str(e) for e in report.errors]
        if report.error_count > len(report.errors):
            errors.append(f"{path}: ... and {report.error_count - len(report.errors)} more errors")
        warnings_ += [str(w) for w in report.warnings]
    if errors:
        shown = errors[:30] + ([f"... and {len(errors) - 30} more"] if len(errors) > 30 else [])
        raise DatasetError(
            "the training data is not valid; fix these and run again "
            "(`lorastack validate FILE` checks a file on its own):\n  " + "\n  ".join(shown)
        )
    return warnings_


def prepare_run(store: Store, spec_path: str | os.PathLike[str], overrides: Any = None) -> str:
    """Load and check the spec and its datasets, store them, write runs/<id>/spec.yaml; return the run id.

    Nothing heavy is imported here: a bad dataset fails in well under a second.
    """
    from lorastack.spec import load_spec

    spec = load_spec(spec_path, overrides)
    run_id = run_id_for(spec)
    reporter = RunReporter(store, run_id)
    reporter.update("validating", message=f"checking {spec_path} and its datasets")
    paths = _dataset_paths(spec)
    try:
        for warning in validate_datasets(paths):
            log.warning("%s", warning)
    except DatasetError as exc:
        reporter.update("failed", error=str(exc), finished_at=utc_now())
        raise
    shas = {role: store.put_dataset(path)[0] for role, path in paths.items()}
    doc = {**spec.resolved_dict(), "run_id": run_id, "dataset_sha256": shas}
    spec_file = store.run_dir(run_id) / SPEC_FILE
    if spec_file.is_file():
        old = yaml.safe_load(spec_file.read_text(encoding="utf-8")) or {}
        if _identity_of_doc(old) != _identity_of_doc(doc):
            err = TrainerError(
                f"{spec_file} was written for different settings or data than {spec_path} "
                f"({_describe_diff(old, doc)}); its checkpoints will not be resumed with other settings. "
                "Give the job a new `name`, or delete that run directory to start over."
            )
            reporter.update("failed", error=str(err), finished_at=utc_now())
            raise err
    write_bytes_atomic(spec_file, yaml.safe_dump(doc, sort_keys=False).encode("utf-8"))
    return run_id


# ---------------------------------------------------------------------------------------------------
# Spec access (the spec model lives in lorastack.spec; these helpers only read it)
# ---------------------------------------------------------------------------------------------------
def _spec_get(spec: Any, dotted: str, default: Any = ...) -> Any:
    obj = spec
    for part in dotted.split("."):
        if isinstance(obj, dict):
            if part not in obj:
                if default is ...:
                    raise KeyError(dotted)
                return default
            obj = obj[part]
        else:
            if not hasattr(obj, part):
                if default is ...:
                    raise KeyError(dotted)
                return default
            obj = getattr(obj, part)
    return obj


def load_run_spec(store: Store, run_id: str) -> tuple[Any, dict[str, Any]]:
    """(RunSpec, the spec.yaml document) of a prepared run."""
    from lorastack.spec import RunSpec

    path = store.run_dir(run_id) / SPEC_FILE
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainerError(
            f"run {run_id!r} has no {path}; create it with `lorastack finetune JOB.yaml`"
        ) from None
    fields = {k: v for k, v in doc.items() if k not in RUN_KEYS}
    try:
        spec = RunSpec.model_validate(fields)
    except Exception as exc:
        raise TrainerError(f"{path}: not a valid run spec: {exc}") from exc
    if "training" not in (doc.get("dataset_sha256") or {}):
        raise TrainerError(
            f"{path}: has no dataset_sha256.training; recreate the run with `lorastack finetune`"
        )
    return spec, doc


def _identity_of_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """What must match for checkpoints to be resumable: every setting that changes the weights, and the data.

    Mirrors ``RunSpec.fingerprint()``: the options in FINGERPRINT_EXCLUDES (time budget, logging,
    checkpoint cadence and retention) may change between attempts, e.g. to give a stopped run more time;
    data is identified by content (dataset_sha256), not by the path it was read from.
    """
    from lorastack.spec import FINGERPRINT_EXCLUDES

    ident = json.loads(json.dumps(doc, default=str))
    for key in ("run_id", "training_file", "validation_file"):
        ident.pop(key, None)
    for dotted in FINGERPRINT_EXCLUDES:
        *parents, leaf = dotted.split(".")
        node = ident
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return ident


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _describe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = _flatten(_identity_of_doc(old)), _flatten(_identity_of_doc(new))
    changes = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else "") if changes else "no visible change"


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
def remove_incomplete_checkpoints(store: Store, run_id: str) -> list[Path]:
    """Delete checkpoint directories without a COMPLETE marker (left by a killed save)."""
    root = store.checkpoints_dir(run_id)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith("checkpoint-") and not (child / COMPLETE).is_file():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def check_resumable(checkpoint: Path, doc: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint that was trained from other settings or data than ``doc``."""
    ident_path = checkpoint / IDENTITY_FILE
    if not ident_path.is_file():
        raise TrainerError(
            f"{checkpoint} has no {IDENTITY_FILE}, so it cannot be matched to this spec; "
            "delete the run's checkpoints directory to start over"
        )
    trained = json.loads(ident_path.read_text(encoding="utf-8")).get("spec", {})
    if _identity_of_doc(trained) != _identity_of_doc(doc):
        raise TrainerError(
            f"refusing to resume {checkpoint}: it was trained with different settings or data "
            f"({_describe_diff(trained, doc)}). Restore the original spec, give the job a new `name`, "
            f"or delete {checkpoint.parent} to start this run over."
        )


# ---------------------------------------------------------------------------------------------------
# Model and tokenizer loading
# ---------------------------------------------------------------------------------------------------
def _model_source(spec: Any, store: Store) -> tuple[str, dict[str, Any], str]:
    """(name or path, from_pretrained kwargs, a description of where it is looked for)."""
    base = str(spec.base_model)
    local = Path(base).expanduser()
    if local.is_dir():
        return str(local), {}, f"local directory {local}"
    if base.startswith((".", "/", "~")):
        raise TrainerError(f"base_model {base!r} looks like a path, but there is no such directory")
    kwargs: dict[str, Any] = {}
    revision = _spec_get(spec, "base_revision", None)
    if revision:
        kwargs["revision"] = revision
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]  # passed through, never logged or stored
    if os.environ.get("HF_HOME") or os.environ.get("HF_HUB_CACHE"):
        where = f"the Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or os.environ['HF_HOME']})"
    else:
        kwargs["cache_dir"] = str(store.models_dir)
        where = f"the store's model cache ({store.models_dir})"
    return base, kwargs, where


def _load_error(base: str, where: str, exc: Exception) -> TrainerError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get(
        "TRANSFORMERS_OFFLINE"
    ) in (
        "1",
        "true",
        "True",
    )
    hub = (
        "the hub is switched off (HF_HUB_OFFLINE=1)"
        if offline
        else "the Hugging Face Hub could not provide it"
    )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TrainerError(
        f"cannot load base model {base!r}: not found in {where}, and {hub} ({first}). "
        "Either download it once with network access (e.g. `huggingface-cli download "
        f"{base}` with HF_HOME pointing at the cache; gated models need HF_TOKEN), or set base_model "
        "to a local directory holding the model."
    )


def load_tokenizer(spec: Any, store: Store) -> Any:
    """The base model's tokenizer, which must carry a chat template."""
    from transformers import AutoTokenizer

    base, kwargs, where = _model_source(spec, store)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(base, where, exc) from None
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerError(
            f"base model {base!r} has no chat template in its tokenizer; lorastack trains with the model's "
            "own chat template, so use an instruct/chat model (or add chat_template.jinja to the model dir)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype_for(spec: Any) -> Any:
    """bf16 where the GPU supports it, fp16 on older GPUs (T4), fp32 on CPU unless the spec says otherwise."""
    import torch

    wanted = str(_spec_get(spec, "quantization.compute_dtype", "auto") or "auto")
    if wanted not in ("auto", "", "None"):
        return {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }[wanted]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_base_model(
    spec: Any, store: Store, *, quantize: bool = True, dtype: Any = None
) -> tuple[Any, str | None]:
    """The base model (4-bit NF4 + double quant unless ``quantize`` is False) and its resolved revision."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base, kwargs, where = _model_source(spec, store)
    dtype = dtype or compute_dtype_for(spec)
    load_kwargs: dict[str, Any] = dict(kwargs, dtype=dtype)
    if quantize and bool(_spec_get(spec, "quantization.load_in_4bit", True)):
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=str(_spec_get(spec, "quantization.quant_type", "nf4")),
            bnb_4bit_use_double_quant=bool(_spec_get(spec, "quantization.double_quant", True)),
            bnb_4bit_compute_dtype=dtype,
        )
    load_kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **load_kwargs)
    except (OSError, ValueError) as exc:
        if "quantization" in str(exc).lower() or "bitsandbytes" in str(exc).lower():
            raise
        raise _load_error(base, where, exc) from None
    # The commit actually loaded (hub); a local directory has no revision.
    revision = getattr(model.config, "_commit_hash", None) or (kwargs.get("revision") if kwargs else None)
    return model, revision


def non_embedding_params(model: Any) -> int:
    """N for 6N FLOPs/token: base parameters except the input embeddings (lm_head included).

    4-bit weights are stored packed, so their logical size is read from the quantization state.
    """
    import math as _m

    emb = model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in emb_ids or "lora_" in name:
            continue
        qs = getattr(p, "quant_state", None)
        total += _m.prod(qs.shape) if qs is not None else p.numel()
    return int(total)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
@dataclass
class EncodedData:
    """Pre-tokenized examples (``input_ids`` + ``labels``, -100 where no loss) and what was dropped."""

    rows: list[dict[str, list[int]]]
    tokens: int = 0
    loss_tokens: int = 0
    dropped_fully_masked: int = 0
    dropped_answer_cut: int = 0
    truncated: int = 0


def encode_file(path: Path, tokenizer: Any, max_seq_len: int) -> EncodedData:
    """Tokenize a chat JSONL file with the model's chat template; loss only on assistant tokens."""
    from lorastack.chat import encode_chat

    out = EncodedData(rows=[])
    with open(path, encoding="utf-8-sig") as fh:
        for line in fh:
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            enc = encode_chat(tokenizer, messages, max_seq_len)
            if enc.final_answer_cut:  # never train on a cut answer (the model would learn to stop mid-way)
                out.dropped_answer_cut += 1
                continue
            labels = enc.labels()
            if enc.truncated:
                out.truncated += 1
            if all(lbl == -100 for lbl in labels):
                out.dropped_fully_masked += 1
                continue
            out.rows.append({"input_ids": list(enc.input_ids), "labels": labels})
            out.tokens += len(labels)
            out.loss_tokens += sum(1 for lbl in labels if lbl != -100)
    return out


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
@dataclass
class StopFlags:
    """Set by signal handlers and the time-budget check; read at each step end."""

    signal_name: str | None = None
    time_budget: bool = False


@dataclass
class Outcome:
    """How a run ended, and the process exit code that says so."""

    phase: str
    exit_code: int
    adapter_ref: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class _SignalGuard:
    """SIGTERM/SIGINT set a flag instead of killing the process; a second SIGINT interrupts."""

    def __init__(self, flags: StopFlags):
        self.flags = flags
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding app): no signal handling
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.flags.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.flags.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_training(
    store: Store, run_id: str, *, started: float | None = None, interactive: bool = False
) -> Outcome:
    """Train (or resume) the run ``run_id`` from its spec.yaml and publish its adapter.

    Returns an Outcome; status.json says the same. Never raises for an expected failure (bad data, model
    not found, refused resume): those end in phase "failed" with the error in status.json.
    """
    started = time.monotonic() if started is None else started
    reporter = RunReporter(store, run_id)
    reporter.start_attempt()
    flags = StopFlags()
    try:
        with _SignalGuard(flags):
            return _train(store, run_id, reporter, flags, started, interactive)
    except TrainerError as exc:
        log.error("%s", exc)
        reporter.update("failed", error=str(exc), finished_at=utc_now())
        return Outcome("failed", EXIT_FAILED)
    except KeyboardInterrupt:
        reporter.update("failed", error="interrupted (second Ctrl-C)", finished_at=utc_now())
        raise
    except Exception as exc:
        log.exception("training failed")
        reporter.update("failed", error=f"{type(exc).__name__}: {exc}", finished_at=utc_now())
        return Outcome("failed", EXIT_FAILED)


def _early_stop(reporter: RunReporter, flags: StopFlags) -> Outcome | None:
    """Before training starts: stop now if a signal arrived (nothing to checkpoint yet)."""
    if flags.signal_name:
        reporter.update(
            "preempted",
            message=f"stopped by {flags.signal_name} before training started",
            finished_at=utc_now(),
        )
        return Outcome("preempted", EXIT_PREEMPTED)
    return None


def _train(
    store: Store, run_id: str, reporter: RunReporter, flags: StopFlags, started: float, interactive: bool
) -> Outcome:
    spec, doc = load_run_spec(store, run_id)
    shas: dict[str, str] = doc["dataset_sha256"]
    name = str(spec.name)

    # Already published by an earlier attempt (e.g. a job retry after the publish): nothing to do.
    with contextlib.suppress(StoreError):
        published = store.adapter(name, verify=False)
        if published.manifest.get("run_id") == run_id and not flags.signal_name:
            log.info("run %s is already published as %s", run_id, published.ref)
            reporter.update("succeeded", adapter=published.ref, finished_at=utc_now())
            return Outcome("succeeded", EXIT_OK, published.ref, published.manifest.get("metrics", {}))

    removed = remove_incomplete_checkpoints(store, run_id)
    for path in removed:
        log.info("removed incomplete checkpoint %s (its writer was stopped mid-save)", path.name)
    resume_from = store.latest_checkpoint(run_id)
    if resume_from is not None:
        check_resumable(resume_from, doc)

    # Token-level checks (over-long examples, a cut final answer) need the tokenizer, not the model.
    reporter.update("validating", message=f"checking the datasets with the tokenizer of {spec.base_model}")
    tokenizer = load_tokenizer(spec, store)
    max_seq_len = int(_spec_get(spec, "max_seq_len"))
    paths = {role: store.dataset_path(sha) for role, sha in shas.items()}
    try:
        for warning in validate_datasets(paths, tokenizer=tokenizer, max_seq_len=max_seq_len):
            log.warning("%s", warning)
    except DatasetError as exc:
        raise TrainerError(str(exc)) from None
    train_data = encode_file(paths["training"], tokenizer, max_seq_len)
    eval_data = encode_file(paths["validation"], tokenizer, max_seq_len) if "validation" in paths else None
    if not train_data.rows:
        raise TrainerError(
            f"no training example is left to learn from: {train_data.dropped_answer_cut} have a final answer "
            f"that does not fit in max_seq_len {max_seq_len}, {train_data.dropped_fully_masked} have no trained "
            "assistant token; raise max_seq_len or fix the data"
        )
    if train_data.dropped_answer_cut:
        log.warning(
            "dropped %d training examples whose final answer does not fit in max_seq_len %d",
            train_data.dropped_answer_cut,
            max_seq_len,
        )
    if train_data.dropped_fully_masked:
        log.warning(
            "dropped %d training examples with no trained assistant token", train_data.dropped_fully_masked
        )
    log.info(
        "train: %d examples, %d tokens (%d with loss)",
        len(train_data.rows),
        train_data.tokens,
        train_data.loss_tokens,
    )
    if eval_data is not None and not eval_data.rows:
        log.warning("the validation file has no assistant answer to score; training without evaluation")
        eval_data = None
    if stop := _early_stop(reporter, flags):
        return stop

    reporter.update("loading", message=f"loading {spec.base_model} in 4-bit")
    model, revision = load_base_model(spec, store)
    if stop := _early_stop(reporter, flags):
        return stop
    return _fit_and_publish(
        store,
        run_id,
        spec,
        doc,
        reporter,
        flags,
        started,
        interactive,
        tokenizer,
        model,
        revision,
        train_data,
        eval_data,
        resume_from,
    )


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, peak in GPU_PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def build_sft_trainer(
    spec: Any,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    output_dir: Path,
    *,
    interactive: bool = False,
    callbacks: list | None = None,
    save_total_limit: int | None = None,
) -> Any:
    """A TRL SFTTrainer for a 4-bit base + LoRA on pre-tokenized rows (``input_ids`` + ``labels``)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    # transformers 5 renames gradient_checkpointing* to activation_checkpointing* in v6; TRL/peft still
    # use the old names, so the FutureWarning is noise for our users.
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing\w*` is deprecated", category=FutureWarning
    )
    t = spec.training
    gc = bool(_spec_get(t, "gradient_checkpointing", True))
    gc_kwargs = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    target = _spec_get(spec, "lora.target_modules", "all-linear")
    lora = LoraConfig(
        r=int(_spec_get(spec, "lora.r", 16)),
        lora_alpha=int(_spec_get(spec, "lora.alpha", 32)),
        lora_dropout=float(_spec_get(spec, "lora.dropout", 0.05)),
        target_modules=target if isinstance(target, str) else list(target),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    _keep_4bit_weights_trainable_on_cpu(model)

    on_cuda = torch.cuda.is_available()
    dtype = compute_dtype_for(spec)
    max_steps = _spec_get(t, "max_steps", None)
    epochs = _spec_get(t, "epochs", None)
    eval_steps = _spec_get(t, "eval_steps", None)
    has_eval = bool(eval_rows)
    packing = bool(_spec_get(t, "packing", False))
    max_len = int(_spec_get(spec, "max_seq_len"))
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=int(max_steps) if max_steps else -1,
        num_train_epochs=float(epochs) if epochs else 1.0,
        learning_rate=float(_spec_get(t, "learning_rate", 2e-4)),
        per_device_train_batch_size=int(_spec_get(t, "per_device_batch_size", 1)),
        per_device_eval_batch_size=int(_spec_get(t, "per_device_batch_size", 1)),
        gradient_accumulation_steps=int(_spec_get(t, "gradient_accumulation_steps", 1)),
        warmup_steps=float(_spec_get(t, "warmup_ratio", 0.0) or 0.0),
        lr_scheduler_type=str(_spec_get(t, "lr_scheduler", "linear")),
        seed=int(_spec_get(t, "seed", 42)),
        data_seed=int(_spec_get(t, "seed", 42)),
        logging_steps=int(_spec_get(t, "logging_steps", 1) or 1),
        # eval_steps null = once per epoch
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no",
        eval_steps=int(eval_steps) if has_eval and eval_steps else None,
        # Saving is driven by the time cadence and signals (see _RunCallback), not by steps.
        save_strategy="no",
        save_total_limit=save_total_limit,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs=gc_kwargs,
        max_length=int(_spec_get(spec, "max_seq_len")),
        # Packing is done here (pack_rows + PackedCollator), not by TRL: TRL's padding-free mode
        # flattens the whole micro-batch into one row, so attention costs (batch * max_len)^2 under
        # SDPA; keeping one packed row per batch item costs batch * max_len^2.
        packing=False,
        padding_free=False,
        use_cpu=not on_cuda,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        optim="adamw_torch_fused" if on_cuda else "adamw_torch",
        report_to="none",
        disable_tqdm=not interactive,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        remove_unused_columns=True,
    )
    trainer_cls = _counting_trainer_class(SFTTrainer)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pack_rows(train_rows, max_len) if packing else train_rows),
        eval_dataset=(
            Dataset.from_list(pack_rows(eval_rows, max_len) if packing else eval_rows) if has_eval else None
        ),
        data_collator=PackedCollator(tokenizer.pad_token_id) if packing else None,
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
    if dtype == torch.float16:
        # TRL casts LoRA weights to bf16 for quantized models; fp16 mixed precision (T4) needs fp32
        # master weights for the gradient scaler instead.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def pack_rows(rows: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing of examples into rows of at most ``max_len`` tokens.

    Each packed row keeps ``seq_lengths`` (the example lengths) so the collator can restart
    ``position_ids`` at every example; the first label of each example is masked so no example learns
    to predict across a boundary. Examples longer than ``max_len`` are cut (encode_chat already keeps
    examples within max_seq_len).
    """
    import bisect

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        n = min(len(rows[i]["input_ids"]), max_len)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = max_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for i in members:
            r_ids = rows[i]["input_ids"][:max_len]
            r_labels = list(rows[i]["labels"][:max_len])
            r_labels[0] = -100
            ids += r_ids
            labels += r_labels
            lengths.append(len(r_ids))
        packed.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return packed


class PackedCollator:
    """Batches packed rows: right-padded, ``position_ids`` restarting at each example, no attention mask.

    With ``attention_mask=None`` and restarting ``position_ids``, transformers builds a block-diagonal
    causal mask per row, so packed examples never attend to each other (tested against each example
    run alone). ``num_real_tokens`` (non-pad tokens) is consumed by the trainer for tokens/s.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids, labels, positions = [], [], []
        for e in examples:
            pad = width - len(e["input_ids"])
            ids.append(list(e["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(e["labels"]) + [-100] * pad)
            # padding forms its own block (positions restart), so it never joins a real example
            positions.append([p for n in e["seq_lengths"] for p in range(n)] + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
            "num_real_tokens": torch.tensor(sum(len(e["input_ids"]) for e in examples)),
        }


def _keep_4bit_weights_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a Linear4bit in eval mode converts its weight, permanently, to a packed
    layout whose kernel (gemv_4bit) has no autograd: after the first evaluation, gradients would no
    longer flow back through the frozen base layers (torch warns "an autograd kernel was not
    registered"). Training must keep the standard layout.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - not a 4-bit run
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _counting_trainer_class(base: type) -> type:
    """SFTTrainer that counts the real (non-pad) tokens of every training micro-batch."""

    class CountingSFTTrainer(base):  # type: ignore[misc, valid-type]
        trained_tokens = 0
        loss_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)  # from PackedCollator; not a model input
            if model.training:
                mask = inputs.get("attention_mask")
                if real is not None:
                    self.trained_tokens += int(real)
                else:
                    self.trained_tokens += (
                        int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
                    )
                if "labels" in inputs:
                    self.loss_tokens += int((inputs["labels"] != -100).sum())
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return CountingSFTTrainer


def _time_budget_seconds(spec: Any) -> float | None:
    value = _spec_get(spec, "time_budget", None)
    if value in (None, 0, ""):
        return None
    if hasattr(value, "total_seconds"):
        return float(value.total_seconds())
    return float(value)


def _fit_and_publish(
    store: Store,
    run_id: str,
    spec: Any,
    doc: dict[str, Any],
    reporter: RunReporter,
    flags: StopFlags,
    started: float,
    interactive: bool,
    tokenizer: Any,
    model: Any,
    revision: str | None,
    train_data: EncodedData,
    eval_data: EncodedData | None,
    resume_from: Path | None,
) -> Outcome:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    n_params = non_embedding_params(model)
    peak = _peak_flops()
    budget = _time_budget_seconds(spec)
    save_every = float(_spec_get(spec, "training.save_every_minutes", 10) or 0) * 60
    keep = _spec_get(spec, "training.save_total_limit", 2)
    keep = int(keep) if keep else None
    ckpt_root = store.checkpoints_dir(run_id)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "last_save": time.monotonic(),
        "save_s": 0.0,
        "max_step_s": 0.0,
        "stop_reason": None,
        "train_s": 0.0,
        "step_t0": None,
        "last_loss": None,
        "first_loss": None,
    }
    if resume_from is not None:
        resumed_step = int(resume_from.name.split("-")[-1])
        reporter.truncate_after(resumed_step)
        log.info("resuming from %s (step %d)", resume_from.name, resumed_step)
    trainer_ref: dict[str, Any] = {}

    def emit(line: str) -> None:
        if interactive:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            log.info("%s", line)

    class RunCallback(TrainerCallback):
        """Status/results on the store, throughput, time-cadence/signal/budget checkpoints."""

        def on_step_begin(self, args, st, control, **kw):
            state["step_t0"] = time.monotonic()

        def on_step_end(self, args, st, control, **kw):
            now = time.monotonic()
            if state["step_t0"] is not None:
                dt = now - state["step_t0"]
                state["train_s"] += dt
                state["max_step_s"] = max(state["max_step_s"], dt)
            if flags.signal_name:
                state["stop_reason"] = "signal"
                control.should_save = control.should_training_stop = True
            elif budget is not None:
                # Leave room for one more step, a checkpoint save and a margin before the budget ends.
                reserve = 2 * state["max_step_s"] + max(state["save_s"] * 1.5, 1.0) + min(60.0, 0.05 * budget)
                if now - started + reserve >= budget and st.global_step < st.max_steps:
                    flags.time_budget = True
                    state["stop_reason"] = "time_budget"
                    control.should_save = control.should_training_stop = True
            if save_every and now - state["last_save"] >= save_every:
                control.should_save = True
            if control.should_save:
                state["save_t0"] = now
            return control

        def on_save(self, args, st, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            if ckpt.is_dir():
                write_json_atomic(
                    ckpt / IDENTITY_FILE, {"run_id": run_id, "spec": doc, "saved_at": utc_now()}
                )
                Store.mark_complete(ckpt)  # written last: from here on the checkpoint is trusted
                _rotate_checkpoints(store, run_id, keep)
            state["last_save"] = time.monotonic()
            state["save_s"] = state["last_save"] - state.get("save_t0", state["last_save"])
            reporter.update(checkpoint=ckpt.name, checkpoint_at=utc_now())

        def on_log(self, args, st, control, logs=None, **kw):
            logs = logs or {}
            tr = trainer_ref["trainer"]
            step = st.global_step
            if "loss" in logs:
                now = time.monotonic()
                toks = tr.trained_tokens
                tps = toks / state["train_s"] if state["train_s"] > 0 else 0.0
                mfu = tps * 6 * n_params / peak if peak else None
                state["last_loss"] = float(logs["loss"])
                if state["first_loss"] is None:
                    state["first_loss"] = float(logs["loss"])
                reporter.record(
                    step,
                    train_loss=float(logs["loss"]),
                    train_mean_token_accuracy=_f(logs.get("mean_token_accuracy")),
                )
                reporter.update(
                    "training",
                    step=step,
                    max_steps=st.max_steps,
                    epoch=_f(st.epoch),
                    loss=float(logs["loss"]),
                    learning_rate=_f(logs.get("learning_rate")),
                    tokens_per_s=round(tps, 1),
                    mfu=round(mfu, 4) if mfu is not None else None,
                    trained_tokens=toks,
                    elapsed_s=round(now - started, 1),
                    message=None,
                )
                mfu_txt = f" MFU {mfu:.1%}" if mfu is not None else ""
                emit(
                    f"step {step}/{st.max_steps} loss {logs['loss']:.4f} "
                    f"acc {logs.get('mean_token_accuracy', float('nan')):.3f} {tps:,.0f} tok/s{mfu_txt}"
                )
            if "eval_loss" in logs and not state.get("final_eval"):
                reporter.record(
                    step,
                    valid_loss=float(logs["eval_loss"]),
                    validation_mean_token_accuracy=_f(logs.get("eval_mean_token_accuracy")),
                )
                reporter.update(valid_loss=float(logs["eval_loss"]))
                emit(f"step {step} valid_loss {logs['eval_loss']:.4f}")

    class QuietProgress(ProgressCallback):
        """The tqdm bar without its dict dumps (RunCallback prints a readable line instead)."""

        def on_log(self, args, st, control, logs=None, **kw):
            return None

    trainer = build_sft_trainer(
        spec,
        model,
        tokenizer,
        train_data.rows,
        eval_data.rows if eval_data else None,
        ckpt_root,
        interactive=interactive,
        callbacks=[RunCallback()],
    )
    trainer_ref["trainer"] = trainer
    if interactive:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())
    log.info(
        "model: %s non-embedding params (6N = %.3g FLOP/token); device %s; packing %s",
        f"{n_params:,}",
        6 * n_params,
        trainer.args.device,
        bool(_spec_get(spec, "training.packing", False)),
    )
    reporter.update(
        "training",
        step=int(resume_from.name.split("-")[-1]) if resume_from else 0,
        resumed_from=resume_from.name if resume_from else None,
        message=f"resumed from {resume_from.name}" if resume_from else None,
    )
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.monotonic() - t0
    step = trainer.state.global_step
    tps = trainer.trained_tokens / state["train_s"] if state["train_s"] else 0.0
    metrics = {
        "global_step": step,
        "train_loss": state["last_loss"],
        "first_train_loss": state["first_loss"],
        "train_runtime_s": round(wall, 2),
        "trained_tokens": trainer.trained_tokens,
        "loss_tokens": trainer.loss_tokens,
        "tokens_per_s": round(tps, 1),
        "non_embedding_params": n_params,
    }
    if peak:
        metrics["mfu"] = round(tps * 6 * n_params / peak, 4)
    log.info(
        "trained %d tokens in %.1fs of steps: %.0f tok/s%s",
        trainer.trained_tokens,
        state["train_s"],
        tps,
        f", MFU {metrics['mfu']:.1%}" if peak else "",
    )
    del result

    if state["stop_reason"] == "signal":
        reporter.update(
            "preempted",
            step=step,
            message=f"stopped by {flags.signal_name} at step {step}; checkpoint saved, rerun to resume",
            finished_at=utc_now(),
        )
        return Outcome("preempted", EXIT_PREEMPTED, metrics=metrics)
    if state["stop_reason"] == "time_budget":
        reporter.update(
            "stopped",
            step=step,
            message=f"stopped: time budget (step {step}); checkpoint saved, rerun to resume",
            finished_at=utc_now(),
        )
        log.info("stopped: time budget at step %d; rerun the same command to continue", step)
        return Outcome("stopped", EXIT_TIME_BUDGET, metrics=metrics)

    if eval_data and eval_data.rows:
        state["final_eval"] = True
        ev = trainer.evaluate()
        metrics["full_valid_loss"] = float(ev["eval_loss"])
        metrics["full_valid_mean_token_accuracy"] = _f(ev.get("eval_mean_token_accuracy"))
        reporter.record(
            step,
            full_valid_loss=metrics["full_valid_loss"],
            full_valid_mean_token_accuracy=metrics["full_valid_mean_token_accuracy"],
        )

    reporter.update("publishing", step=step, message="publishing the adapter")
    adapter = publish(store, run_id, spec, doc, trainer.model, tokenizer, revision, metrics)
    log.info("published adapter %s (%s)", adapter.ref, adapter.path)
    merged = None
    if bool(_spec_get(spec, "merge_16bit", False)):
        del trainer, model
        merged = merge_16bit(store, run_id, spec, adapter.path)
        log.info("merged 16-bit model written to %s", merged)
    reporter.update(
        "succeeded",
        step=step,
        adapter=adapter.ref,
        metrics=metrics,
        merged=str(merged) if merged else None,
        message=None,
        finished_at=utc_now(),
    )
    return Outcome("succeeded", EXIT_OK, adapter.ref, metrics)


def _f(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _rotate_checkpoints(store: Store, run_id: str, keep: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints (called only after the newest one is marked)."""
    if not keep:
        return
    for _, path in store.complete_checkpoints(run_id)[:-keep]:
        # Unmark first so a reader never sees a COMPLETE marker on a half-deleted directory.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------
def publish(
    store: Store,
    run_id: str,
    spec: Any,
    doc: dict[str, Any],
    model: Any,
    tokenizer: Any,
    revision: str | None,
    metrics: dict[str, Any],
) -> Any:
    """Save adapter + tokenizer + chat template to a scratch dir, then publish it atomically to the store."""
    template = tokenizer.chat_template
    with tempfile.TemporaryDirectory(prefix="lorastack-adapter-") as tmp:
        out = Path(tmp) / "adapter"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if not (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        manifest = {
            "run_id": run_id,
            "base_model": str(spec.base_model),
            "base_revision": revision,
            "chat_template": template,
            "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
            "dataset_sha256": doc["dataset_sha256"],
            "spec": {k: v for k, v in doc.items() if k not in RUN_KEYS},
            "metrics": metrics,
        }
        return store.publish_adapter(str(spec.name), out, manifest)


def merge_16bit(store: Store, run_id: str, spec: Any, adapter_dir: Path) -> Path:
    """Merge the adapter into a 16-bit copy of the base (never into 4-bit weights); save runs/<id>/merged/."""
    import gc

    import torch
    from peft import PeftModel

    gc.collect()
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    base, _ = load_base_model(spec, store, quantize=False, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    run_dir = store.run_dir(run_id)
    final = run_dir / "merged"
    staging = run_dir / f".tmp-merged-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(staging)
    Store.mark_complete(staging)
    old = run_dir / f".old-merged-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
