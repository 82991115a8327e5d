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
3. The base model is loaded in 4-bit NF4 with double quantization (lorastack.models), prepared for k-bit
   training with non-reentrant gradient checkpointing, and wrapped in a LoRA adapter (PEFT).
4. TRL's ``SFTTrainer`` trains on the pre-tokenized data (TRL keeps a ``labels`` column as is). With
   ``packing``, examples are packed into rows of ``max_seq_len`` that never attend to each other
   (lorastack.packing).
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

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lorastack import distributed, models
from lorastack.packing import PackedCollator, pack_rows
from lorastack.progress import RunReporter, utc_now
from lorastack.store import (
    COMPLETE,
    SPEC_FILE,
    Store,
    StoreError,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from lorastack.spec import RunSpec

log = logging.getLogger("lorastack.trainer")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIME_BUDGET = 3  # stopped itself before the time budget ran out; rerun to continue
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the replica was asked to stop; rerun (a job retry) resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (a checkpoint is saved once training has started); rerun resumes

NEXT_RUN = "next"  # `lorastack train --run next`: claim the oldest run queued on the store
# Written into every checkpoint: what it was trained from, so a resume with other settings is refused.
IDENTITY_FILE = "lorastack-run.json"
# Extra keys lorastack adds to the resolved spec in runs/<id>/spec.yaml.
RUN_KEYS = ("run_id", "dataset_sha256", "holdout")
MIN_TRAINING_EXAMPLES = 10  # Azure's minimum, checked by lorastack.data; a hold-out never goes below it
BEST_DIR = "best"  # runs/<id>/best/: the adapter weights of the best evaluation (keep_best)

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


def setup_logging(verbose: bool = False) -> None:
    """lorastack's log lines on stderr; third-party chatter (HF progress bars and info, the bitsandbytes
    ``kernels`` warning) only with ``verbose``. Call before torch/transformers are imported."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s lorastack: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool = False) -> None:
    """Silence what the libraries print on their own, unless ``verbose``: one progress bar is ours."""
    if verbose:
        log.setLevel(logging.DEBUG)
        return
    # transformers 5 renames gradient_checkpointing* to activation_checkpointing* in v6; TRL/peft still use the
    # old names, so the FutureWarning is noise for our users.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing\w*` is deprecated", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns on every CPU run that the optional `kernels` package is missing; the fallback is fine.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("transformers", "datasets", "trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


# Warnings already shown in this process (finetune checks the data before training, then the trainer checks it
# again with the tokenizer): each is printed once, under the user's file name.
_SHOWN_WARNINGS: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _SHOWN_WARNINGS:
        _SHOWN_WARNINGS.add(text)
        log.warning("%s", text)


def is_user_error(exc: Exception) -> bool:
    """Errors that describe bad input (spec file, overrides, data), printed without a traceback.

    Spec errors from lorastack.spec carry their own file/key message; TrainerError says what to do.
    """
    from lorastack.spec import SpecError

    return isinstance(exc, (TrainerError, SpecError, StoreError, FileNotFoundError))


# ---------------------------------------------------------------------------------------------------
# Preparing a run: spec + datasets into the store
# ---------------------------------------------------------------------------------------------------
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
    # <name>-<fingerprint[:12]>: the same spec and data always map to the same run (and resume it).
    run_id = spec.run_id()
    holder = store.run_lock_holder(run_id) if store.run_dir(run_id).is_dir() else None
    if holder and holder.get("alive"):  # checked before status.json is touched: it belongs to that trainer
        raise TrainerError(
            f"run {run_id} is already being trained by pid {holder.get('pid')} on {holder.get('host')} "
            f"(heartbeat {holder.get('heartbeat_age_s')}s ago); one trainer per run: wait for it or stop it"
        )
    reporter = RunReporter(store, run_id)
    reporter.update("validating", message=f"checking {spec_path} and its datasets")
    paths = {role: Path(p) for role, p in spec.data_files().items()}
    try:
        for warning in validate_datasets(paths):
            _warn_once(warning)
    except DatasetError as exc:
        _fail(reporter, str(exc))
        raise
    shas = {role: store.put_dataset(path)[0] for role, path in paths.items()}
    doc = {**spec.resolved_dict(), "run_id": run_id, "dataset_sha256": shas}
    if "validation" not in paths and spec.training.holdout > 0:
        split = hold_out(store, paths["training"], spec.training.holdout, spec.training.seed)
        if split is not None:
            doc["dataset_sha256"] = {"training": split["training"], "validation": split["validation"]}
            doc["holdout"] = split["holdout"]
    spec_file = store.run_dir(run_id) / SPEC_FILE
    if spec_file.is_file():
        old = yaml.safe_load(spec_file.read_text(encoding="utf-8")) or {}
        if _identity_of_doc(old) != _identity_of_doc(doc):
            err = TrainerError(
                f"{spec_file} was written for different settings or data than {spec_path} "
                f"({_describe_diff(old, doc)}); its checkpoints will not be resumed with other settings. "
                "Give the job a new `name`, or delete that run directory to start over."
            )
            _fail(reporter, str(err))
            raise err
    write_bytes_atomic(spec_file, yaml.safe_dump(doc, sort_keys=False).encode("utf-8"))
    return run_id


def hold_out(store: Store, path: Path, fraction: float, seed: int) -> dict[str, Any] | None:
    """Split a training file (no validation file given) into a training part and a seeded held-out part.

    ``fraction`` of the examples (at least one) are held out, but never so many that fewer than
    MIN_TRAINING_EXAMPLES remain. Both parts go into the store content-addressed; returns their sha256 and
    what was done, or None (and says why) when the file is too small to spare an example.
    """
    import random

    lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    n = len(lines)
    k = min(max(1, round(n * fraction)), n - MIN_TRAINING_EXAMPLES)
    if k < 1:
        log.warning(
            "no validation file and only %d training examples: nothing is held out (training needs at least %d); "
            "add a validation_file to evaluate this run",
            n,
            MIN_TRAINING_EXAMPLES,
        )
        return None
    held = set(random.Random(seed).sample(range(n), k))
    parts = {
        "training": [ln for i, ln in enumerate(lines) if i not in held],
        "validation": [ln for i, ln in enumerate(lines) if i in held],
    }
    shas = {}
    with tempfile.TemporaryDirectory(prefix="lorastack-holdout-") as tmp:
        for role, part in parts.items():
            f = Path(tmp) / f"{role}.jsonl"
            f.write_text("\n".join(part) + "\n", encoding="utf-8")
            shas[role] = store.put_dataset(f)[0]
    log.info(
        "no validation file: holding out %d of %d training examples (seeded %g%%, seed %d) to evaluate on",
        k, n, fraction * 100, seed,
    )
    return {
        **shas,
        "holdout": {"from_sha256": store.put_dataset(path)[0], "examples": k, "of": n, "fraction": fraction,
                    "seed": seed},
    }


def _fail(reporter: RunReporter, error: str) -> None:
    """Record a failed attempt in status.json."""
    reporter.update("failed", error=error, finished_at=utc_now())


# ---------------------------------------------------------------------------------------------------
# The prepared run's spec, and what must match to resume it
# ---------------------------------------------------------------------------------------------------
def load_run_spec(store: Store, run_id: str) -> tuple[RunSpec, dict[str, Any]]:
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


def _rotate_checkpoints(store: Store, run_id: str, keep: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints (called only after the newest one is marked)."""
    if not keep:
        return
    for _, path in store.complete_checkpoints(run_id)[:-keep]:
        # Unmark first so a reader never sees a COMPLETE marker on a half-deleted directory.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Model and tokenizer: the run spec's settings, loaded by lorastack.models
# ---------------------------------------------------------------------------------------------------
def load_tokenizer(spec: RunSpec, store: Store) -> Any:
    """The base model's tokenizer (it must carry a chat template), padding with eos if it has no pad token."""
    try:
        tokenizer = models.load_tokenizer(
            spec.base_model, spec.base_revision, models.hub_cache_dir(store.models_dir)
        )
    except models.ModelLoadError as exc:
        raise TrainerError(str(exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    spec: RunSpec, store: Store, *, quantize: bool = True, compute_dtype: str | None = None
) -> tuple[Any, str | None]:
    """The base model as the spec says (4-bit NF4 + double quant unless ``quantize`` is False or the spec
    says ``load_in_4bit: false``) and its resolved revision. ``compute_dtype`` overrides the spec's."""
    q = spec.quantization
    try:
        return models.load_base_model(
            spec.base_model,
            spec.base_revision,
            models.hub_cache_dir(store.models_dir),
            quantize=quantize and q.load_in_4bit,
            quant_type=q.quant_type,
            double_quant=q.double_quant,
            compute_dtype=compute_dtype or q.compute_dtype,
        )
    except models.ModelLoadError as exc:
        raise TrainerError(str(exc)) from None


def non_embedding_params(model: Any) -> int:
    """N for 6N FLOPs/token: base parameters except the input embeddings (lm_head included).

    4-bit weights are stored packed, so their logical size is read from the quantization state.
    """
    emb = model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in emb_ids or "lora_" in name:
            continue
        qs = getattr(p, "quant_state", None)
        total += math.prod(qs.shape) if qs is not None else p.numel()
    return int(total)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
@dataclass
class EncodedData:
    """Pre-tokenized examples (``input_ids`` + ``labels``, -100 where no loss), what was dropped, and the data
    checks' findings from the same pass (``errors`` / ``warnings`` as ``file:line: ...`` text)."""

    rows: list[dict[str, list[int]]]
    tokens: int = 0
    loss_tokens: int = 0
    dropped_fully_masked: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def encode_file(
    path: Path, tokenizer: Any, max_seq_len: int, *, purpose: str = "train", display_name: str | None = None
) -> EncodedData:
    """Check and tokenize a chat JSONL file in one pass (lorastack.data's checks with the tokenizer, which encode
    every example with :func:`lorastack.chat.encode_chat`: the model's chat template, loss only on assistant
    tokens). Examples whose final answer does not fit are errors there, so none is ever trained on cut."""
    from lorastack.data import validate_file

    out = EncodedData(rows=[])

    def keep(_line: int, enc: Any) -> None:
        labels = enc.labels()
        if all(lbl == -100 for lbl in labels):
            out.dropped_fully_masked += 1
            return
        out.truncated += bool(enc.truncated)
        out.rows.append({"input_ids": list(enc.input_ids), "labels": labels})
        out.tokens += len(labels)
        out.loss_tokens += sum(1 for lbl in labels if lbl != -100)

    # The structural warnings were shown when the run was prepared (finetune, or the cloud submit); this pass
    # adds only what needs the tokenizer, under the user's file name rather than the store's sha256 path.
    report = validate_file(path, tokenizer=tokenizer, max_seq_len=max_seq_len, purpose=purpose,
                           display_name=display_name, structure_warnings=False, on_encoded=keep)
    out.errors = [str(e) for e in report.errors]
    if report.error_count > len(report.errors):
        out.errors.append(f"{display_name or path}: ... and {report.error_count - len(report.errors)} more errors")
    out.warnings = [str(w) for w in report.warnings]
    return out


def encode_datasets(
    paths: dict[str, Path], tokenizer: Any, max_seq_len: int, display: dict[str, str] | None = None
) -> tuple[EncodedData, EncodedData | None]:
    """Check and encode the datasets in one tokenizer pass each: (training, validation or None).

    Logs what was dropped; raises DatasetError for invalid data, TrainerError if no training example is
    left. A validation file with nothing to score is dropped (None), so the run trains without evaluation.
    """
    display = display or {}
    encoded = {
        role: encode_file(path, tokenizer, max_seq_len, purpose="validation" if role == "validation" else "train",
                          display_name=display.get(str(path)))
        for role, path in paths.items()
    }
    errors = [e for data in encoded.values() for e in data.errors]
    if errors:
        shown = errors[:30] + ([f"... and {len(errors) - 30} more"] if len(errors) > 30 else [])
        raise DatasetError(
            "the training data is not valid; fix these and run again "
            "(`lorastack validate FILE` checks a file on its own):\n  " + "\n  ".join(shown)
        )
    for data in encoded.values():
        for warning in data.warnings:
            _warn_once(warning)
    train_data, eval_data = encoded["training"], encoded.get("validation")
    if not train_data.rows:
        raise TrainerError(
            f"no training example is left to learn from: {train_data.dropped_fully_masked} have no trained "
            "assistant token; fix the data"
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
    return train_data, eval_data


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
@dataclass
class StopFlags:
    """Set by the signal handlers; read at each step end and before every evaluation batch.

    While ``immediate`` (loading the tokenizer, the data or the model: nothing to checkpoint yet), a signal
    raises :class:`_StopNow` at once, so Ctrl-C works during a long model load or download.
    """

    signal_name: str | None = None
    immediate: bool = True

    def stop_requested(self) -> bool:
        return self.signal_name is not None


class _StopNow(BaseException):
    """A signal arrived while nothing could be checkpointed: stop without one (nothing was trained yet)."""


@dataclass
class Outcome:
    """How a run ended, and the process exit code that says so."""

    phase: str
    exit_code: int
    adapter_ref: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    promotion: dict[str, Any] | None = None


class _SignalGuard:
    """SIGTERM/SIGINT set a flag instead of killing the process; a second SIGINT interrupts at once."""

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
        if self.flags.immediate:
            raise _StopNow

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _signal_outcome(flags: StopFlags) -> tuple[str, int]:
    """(phase, exit code) for a stop by signal: Ctrl-C is 130 (the shell convention), SIGTERM 143."""
    if flags.signal_name == "SIGINT":
        return "stopped", EXIT_INTERRUPTED
    return "preempted", EXIT_PREEMPTED


@dataclass
class _Run:
    """One attempt at a prepared run: its spec, where it reports, and how it is stopped and printed."""

    store: Store
    run_id: str
    spec: RunSpec
    doc: dict[str, Any]  # runs/<id>/spec.yaml
    reporter: RunReporter
    flags: StopFlags
    started: float  # time.monotonic() when the process started (the time budget counts from there)
    interactive: bool
    verbose: bool = False
    fast_path: dict[str, Any] | None = None  # the settings "auto" resolved to (choose_fast_path), once per run

    def emit(self, line: str, *, always: bool = False) -> None:
        """A progress line: above the progress bar when interactive (only ``always`` ones unless verbose),
        else to the log."""
        if self.interactive:
            if always or self.verbose:
                from tqdm.auto import tqdm

                tqdm.write(line, file=sys.stderr)
        else:
            log.info("%s", line)


def run_training(
    store: Store, run_id: str, *, started: float | None = None, interactive: bool = False, verbose: bool = False
) -> Outcome:
    """Train (or resume) the run ``run_id`` from its spec.yaml and publish its adapter.

    One trainer per run: the run's lock is held throughout; a second process is refused (exit 1, and the
    first one's status.json is left alone). Returns an Outcome; status.json says the same. Never raises for
    an expected failure (bad data, model not found, refused resume): those end in phase "failed" with the
    error in status.json.
    """
    started = time.monotonic() if started is None else started
    if not distributed.is_main():  # data-parallel: rank 0 holds the run's lock for all ranks
        return _run_locked(store, run_id, started, interactive, verbose)
    lock = store.run_lock(run_id)
    try:
        lock.acquire()
    except StoreError as exc:
        log.error("%s", exc)
        return Outcome("failed", EXIT_FAILED)
    try:
        return _run_locked(store, run_id, started, interactive, verbose)
    finally:
        lock.release()


def _run_locked(store: Store, run_id: str, started: float, interactive: bool, verbose: bool) -> Outcome:
    reporter = distributed.reporter_for(store, run_id)  # rank 0 writes status.json; other ranks stay silent
    reporter.start_attempt()
    flags = StopFlags()
    try:
        with _SignalGuard(flags):
            try:
                spec, doc = load_run_spec(store, run_id)
                return _train(_Run(store, run_id, spec, doc, reporter, flags, started, interactive, verbose))
            except _StopNow:
                phase, code = _signal_outcome(flags)
                reporter.update(
                    phase,
                    message=f"stopped by {flags.signal_name} before training started; rerun to start again",
                    finished_at=utc_now(),
                )
                return Outcome(phase, code)
    except TrainerError as exc:
        log.error("%s", exc)
        _fail(reporter, str(exc))
        return Outcome("failed", EXIT_FAILED)
    except KeyboardInterrupt:
        _fail(reporter, "interrupted (second Ctrl-C)")
        raise
    except Exception as exc:
        log.exception("training failed")
        _fail(reporter, f"{type(exc).__name__}: {exc}")
        return Outcome("failed", EXIT_FAILED)


def _already_published(run: _Run) -> Outcome | None:
    """The run's adapter, if an earlier attempt published it: any version whose manifest records this run id
    (a re-run after a crash between publish steps finishes that version instead of publishing another)."""
    store, name = run.store, run.spec.name
    published = store.version_of_run(name, run.run_id)
    if published is None:
        return None
    promotion = published.manifest.get("promotion") or {}
    if promotion.get("verdict") == "promoted":
        store.ensure_promoted(name, published.version, _promotion_reason(promotion))
    log.info("run %s is already published as %s", run.run_id, published.ref)
    _after_publish(run)
    run.reporter.update("succeeded", adapter=published.ref, finished_at=utc_now(), message=None)
    return Outcome("succeeded", EXIT_OK, published.ref, published.manifest.get("metrics", {}), promotion)


def _after_publish(run: _Run) -> None:
    """Prune the run's checkpoints (``training.keep_checkpoints`` kept; none by default) and the best copy."""
    keep = run.spec.training.keep_checkpoints
    removed = run.store.prune_checkpoints(run.run_id, keep)
    shutil.rmtree(run.store.run_dir(run.run_id) / BEST_DIR, ignore_errors=True)
    if removed:
        log.info("removed %d checkpoint(s) of the published run (keep_checkpoints: %d)", len(removed), keep)


def _train(run: _Run) -> Outcome:
    """Resume point, data, tokenizer and model for the run; then fit and publish."""
    store, run_id, spec = run.store, run.run_id, run.spec
    if done := _already_published(run):
        return done
    _clean_run_leftovers(store, run_id)

    for path in remove_incomplete_checkpoints(store, run_id):
        log.info("removed incomplete checkpoint %s (its writer was stopped mid-save)", path.name)
    resume_from = store.latest_checkpoint(run_id)
    if resume_from is not None:
        check_resumable(resume_from, run.doc)

    # Token-level checks (over-long examples, a cut final answer) need the tokenizer, not the model.
    run.reporter.update(
        "validating", message=f"checking the datasets with the tokenizer of {spec.base_model}"
    )
    quiet_libraries(run.verbose)
    tokenizer = load_tokenizer(spec, store)
    config = base_config(spec, store)
    check_context_length(spec, config)
    paths = {role: store.dataset_path(sha) for role, sha in run.doc["dataset_sha256"].items()}
    train_data, eval_data = encode_datasets(paths, tokenizer, spec.max_seq_len, _display_names(run.doc, paths))

    longest = max(len(r["input_ids"]) for data in (train_data, eval_data) if data for r in data.rows)
    prior = _checkpoint_record(resume_from)[0].get("fast_path", LEGACY_FAST_PATH) if resume_from else None
    spec, run.fast_path = choose_fast_path(spec, config, longest, prior=prior)
    run.spec = spec
    log.info("%s", describe_fast_path(run.fast_path))
    run.reporter.update("loading", message=f"loading {spec.base_model}"
                        f"{' in 4-bit' if spec.quantization.load_in_4bit else ''}", fast_path=run.fast_path)
    model, revision = load_base_model(spec, store)
    quiet_libraries(run.verbose)
    return _fit_and_publish(run, tokenizer, model, revision, train_data, eval_data, resume_from)


def _clean_run_leftovers(store: Store, run_id: str) -> None:
    from lorastack.store import _clean_tmp

    for path in _clean_tmp(store.run_dir(run_id)):
        log.info("removed %s, left by a killed writer", path.name)


def _display_names(doc: dict[str, Any], paths: dict[str, Path]) -> dict[str, str]:
    """Stored dataset path -> the name the user knows it by (for warnings)."""
    names = {}
    held = doc.get("holdout")
    for role, path in paths.items():
        original = doc.get("training_file") if (role == "training" or held) else doc.get("validation_file")
        if original:
            names[str(path)] = f"{original} ({role} part)" if held else str(original)
    return names


def base_config(spec: RunSpec, store: Store) -> Any:
    """The base model's transformers config, or None when it cannot be read (the model load names why)."""
    from transformers import AutoConfig

    name, kwargs, _ = models.model_source(spec.base_model, spec.base_revision, models.hub_cache_dir(store.models_dir))
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError):
        return None


def check_context_length(spec: RunSpec, config: Any) -> None:
    """Refuse a max_seq_len longer than the base model's context (positions past it were never trained)."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and spec.max_seq_len > context:
        raise TrainerError(
            f"max_seq_len {spec.max_seq_len} is longer than the context of {spec.base_model} ({context} tokens); "
            f"set max_seq_len: {context} or less in the spec (or --set max_seq_len={context})"
        )


# What "auto" meant before the fast path was chosen per run: a checkpoint without a record resumes with these.
LEGACY_FAST_PATH = {"packing": True, "gradient_checkpointing": True}


def choose_fast_path(
    spec: RunSpec, config: Any, longest_example: int, *, prior: dict[str, Any] | None = None
) -> tuple[RunSpec, dict[str, Any]]:
    """The spec with every fast-path setting it leaves at "auto" resolved, and a record of what was chosen.

    A resumed run passes ``prior`` (its checkpoint's record) and keeps those choices, so rows, micro-batches and
    numerics match the checkpoint even on another device; otherwise lorastack.train_defaults chooses from this
    device, the model's shape (``config``, read without loading weights) and the longest example. Settings the
    spec gives explicitly always win. Every rank chooses from the same inputs, so all ranks agree.
    """
    from lorastack import train_defaults as td

    t, q = spec.training, spec.quantization
    chosen: dict[str, Any] = dict(prior or {})
    reasons: list[str] = list(chosen.pop("reasons", []))
    if prior is None and config is not None:
        d = td.choose(td.detect(), **td.shape_of_config(config), max_seq_len=spec.max_seq_len,
                      micro_batch=t.per_device_batch_size, longest_example=longest_example,
                      quantized=q.load_in_4bit)
        chosen = {"compute_dtype": d.compute_dtype, "packing": d.packing, "row_len": d.row_len,
                  "gradient_checkpointing": d.gradient_checkpointing, "padding_free": d.padding_free}
        reasons = d.reasons
    explicit = {"compute_dtype": q.compute_dtype, "packing": t.packing, "row_len": t.row_len,
                "gradient_checkpointing": t.gradient_checkpointing}
    fallback = {"compute_dtype": "auto", "packing": True, "row_len": spec.max_seq_len, "gradient_checkpointing": True}
    out = {k: v if v != "auto" else chosen.get(k, fallback[k]) for k, v in explicit.items()}
    if out["compute_dtype"] == "auto":  # no config to choose from: the model load names the problem
        out["compute_dtype"] = str(models.compute_dtype("auto")).removeprefix("torch.")
    out["row_len"] = min(int(out["row_len"]), spec.max_seq_len)
    if out["packing"]:  # a micro-batch keeps per_device_batch_size x max_seq_len tokens, in rows of row_len
        out["batch_rows"] = t.per_device_batch_size * max(1, spec.max_seq_len // out["row_len"])
    else:
        out["row_len"], out["batch_rows"] = spec.max_seq_len, t.per_device_batch_size
    given = [k for k, v in explicit.items() if v != "auto"]
    record = {**out, "padding_free": bool(chosen.get("padding_free", False)),
              "reasons": ([f"set in the spec: {', '.join(given)}"] if given else []) + reasons,
              "resumed": prior is not None}
    training = t.model_copy(update={"packing": out["packing"], "row_len": out["row_len"],
                                    "gradient_checkpointing": out["gradient_checkpointing"],
                                    "per_device_batch_size": out["batch_rows"]})
    quantization = q.model_copy(update={"compute_dtype": out["compute_dtype"]})
    return spec.model_copy(update={"training": training, "quantization": quantization}), record


def describe_fast_path(record: dict[str, Any]) -> str:
    """One log line: what the run trains with and why."""
    rows = (f"packing on, {record['batch_rows']} rows of {record['row_len']} tokens per micro-batch"
            if record["packing"] else f"packing off, {record['batch_rows']} examples per micro-batch")
    head = (f"fast path{' (kept from the checkpoint)' if record.get('resumed') else ''}: "
            f"{record['compute_dtype']}, {rows}, gradient checkpointing "
            f"{'on' if record['gradient_checkpointing'] else 'off'}")
    return head + (f" ({'; '.join(record['reasons'])})" if record.get("reasons") else "")


def _checkpoint_record(checkpoint: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(lorastack record, HF trainer_state) of a checkpoint; empty dicts for none."""
    if checkpoint is None:
        return {}, {}
    record = json.loads((checkpoint / IDENTITY_FILE).read_text(encoding="utf-8"))
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    return record, state


def _fit_and_publish(
    run: _Run,
    tokenizer: Any,
    model: Any,
    revision: str | None,
    train_data: EncodedData,
    eval_data: EncodedData | None,
    resume_from: Path | None,
) -> Outcome:
    """Train to the end (or to a signal, early stop or the time budget), evaluate, publish; the Outcome says which."""
    store, run_id, spec, reporter = run.store, run.run_id, run.spec, run.reporter
    record, hf_state = _checkpoint_record(resume_from)
    resumed_step = int(hf_state.get("global_step", resume_from.name.split("-")[-1])) if resume_from else 0
    # A checkpoint taken after the last step (a signal during the last step or the final evaluation) is
    # finished training: the re-run evaluates and publishes it and never trains a step past max_steps.
    done_training = bool(record.get("training_done")) or (
        resume_from is not None and 0 < int(hf_state.get("max_steps") or 0) <= resumed_step
    )
    if resume_from is not None:
        reporter.truncate_after(resumed_step)
        log.info("resuming from %s (step %d)%s", resume_from.name, resumed_step,
                 "; training is already complete" if done_training else "")
    monitor = _RunMonitor(run, non_embedding_params(model), _peak_flops(), prior=record)
    trainer = _build_run_trainer(run, monitor, model, tokenizer, train_data, eval_data)
    reporter.update(
        "training",
        step=resumed_step,
        resumed_from=resume_from.name if resume_from else None,
        message=f"resumed from {resume_from.name}" if resume_from else None,
    )
    t0 = time.monotonic()
    run.flags.immediate = False  # from here on a signal is answered with a checkpoint
    if run.flags.stop_requested():
        phase, code = _signal_outcome(run.flags)
        reporter.update(phase, message=f"stopped by {run.flags.signal_name} before training started",
                        finished_at=utc_now())
        return Outcome(phase, code)
    if done_training:
        trainer._load_from_checkpoint(str(resume_from))  # the weights only: nothing is left to train
        from transformers import TrainerState

        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    else:
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except _EvalInterrupted:
            # A signal during a mid-training evaluation: the step before it is whole; checkpoint it and stop.
            monitor.stop_reason = "signal"
            _save_now(trainer, monitor)
    metrics = monitor.metrics(wall=time.monotonic() - t0)
    step = trainer.state.global_step
    if monitor.stop_reason in ("signal", "time_budget"):
        return _stopped(run, monitor.stop_reason, step, metrics)
    if monitor.stop_reason == "early_stopping":
        log.info("early stopping at step %d: no better validation loss for %d evaluations",
                 step, spec.training.early_stopping_patience)
        metrics["early_stopped_at"] = step
    if spec.training.keep_best and (best := _load_best(run, trainer.model)) is not None:
        metrics.update(best)

    has_eval = bool(eval_data and eval_data.rows)
    policy = spec.promote_policy(has_eval)
    try:
        promotion, evaluation = _gate(run, trainer.model, tokenizer, eval_data, policy, revision)
    except _GateInterrupted:
        # Trained but not yet evaluated: keep the trained weights in a checkpoint marked done, then stop.
        monitor.stop_reason = "signal"
        monitor.training_done = True
        _save_now(trainer, monitor)
        return _stopped(run, "signal", step, metrics)
    if promotion.get("candidate_loss") is not None:
        metrics["eval_loss"] = promotion["candidate_loss"]
        metrics["full_valid_loss"] = promotion["candidate_loss"]
        metrics["full_valid_mean_token_accuracy"] = promotion.get("candidate_token_accuracy")
        reporter.record(step, full_valid_loss=metrics["eval_loss"],
                        full_valid_mean_token_accuracy=_f(promotion.get("candidate_token_accuracy")))

    if not distributed.is_main():  # data-parallel: rank 0 publishes, the other ranks are done
        return Outcome("succeeded", EXIT_OK, None, metrics)
    reporter.update("publishing", step=step, message="publishing the adapter")
    adapter = publish(store, run_id, spec, run.doc, trainer.model, tokenizer, revision, metrics,
                      promotion=promotion, evaluation=evaluation, fast_path=run.fast_path)
    log.info("published adapter %s (%s); %s", adapter.ref, adapter.path, describe_promotion(adapter.ref, promotion))
    _after_publish(run)
    merged = None
    if spec.merge_16bit:
        del trainer, model, monitor  # let the 4-bit training copy go before a 16-bit base is loaded
        merged = merge_16bit(store, run_id, spec, adapter.path)
        log.info("merged 16-bit model written to %s", merged)
    reporter.update(
        "succeeded",
        step=step,
        adapter=adapter.ref,
        metrics=metrics,
        promotion=promotion,
        merged=str(merged) if merged else None,
        message=None,
        finished_at=utc_now(),
    )
    return Outcome("succeeded", EXIT_OK, adapter.ref, metrics, promotion)


def _save_now(trainer: Any, monitor: _RunMonitor) -> None:
    """Write a checkpoint of the current step outside the trainer's own save points (then marked COMPLETE)."""
    trainer._save_checkpoint(trainer.model, trial=None)
    monitor.saved(Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")


class _EvalInterrupted(Exception):
    """Raised from an evaluation batch when a signal arrived (see _RunMonitor.prediction_step)."""


class _GateInterrupted(Exception):
    """A signal arrived during the final evaluation / promotion gate."""


def describe_promotion(ref: str | None, promotion: dict[str, Any]) -> str:
    """One line: whether the published version ``ref`` became LATEST, and the figures that decided it."""
    verdict, name = promotion.get("verdict"), (ref or "").split("@")[0]
    figures = ""
    if promotion.get("baseline_loss") is not None and promotion.get("candidate_loss") is not None:
        figures = (f" (eval loss {promotion['candidate_loss']:.4f} vs {promotion['baseline_loss']:.4f} "
                   f"for {promotion.get('baseline')})")
    if verdict == "promoted":
        return f"{ref} is now LATEST (promote: {promotion.get('policy', 'always')}){figures}"
    if verdict == "kept":
        return (f"{ref} was NOT promoted: it does not beat {promotion.get('baseline')}{figures}; LATEST is "
                f"unchanged. Compare with `lorastack eval {ref}`, promote it with `lorastack adapters promote {ref}`")
    return f"{ref} published, not promoted (promote: never); `lorastack adapters promote {ref}` serves it as {name}"


def _promotion_reason(promotion: dict[str, Any]) -> str:
    policy, cand, base = promotion.get("policy"), promotion.get("candidate_loss"), promotion.get("baseline_loss")
    if policy == "if_better" and cand is not None and base is not None:
        cmp = "<" if promotion.get("verdict") == "promoted" else ">="
        return f"if_better: eval loss {cand:.4f} {cmp} {base:.4f} of {promotion.get('baseline')}"
    return f"promote: {policy}"


def _gate(
    run: _Run, model: Any, tokenizer: Any, eval_data: EncodedData | None, policy: str, revision: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The final evaluation and the promotion verdict: (manifest ``promotion``, eval.json metrics or None).

    The candidate and its baseline (the current LATEST on the same base, else the base model itself) are
    scored on the same validation rows with the same masks, on the one model in memory (the baseline
    adapter is loaded beside the trained one, or the adapter is switched off for the base).
    """
    from lorastack import evaluate

    promotion: dict[str, Any] = {"policy": policy, "verdict": None, "candidate_loss": None,
                                 "baseline": None, "baseline_loss": None}
    if not (eval_data and eval_data.rows):
        if policy == "if_better":
            log.warning("promote: if_better, but the run has no validation data to compare on: promoting it")
        promotion["verdict"] = "skipped" if policy == "never" else "promoted"
        return promotion, None
    run.reporter.update("training", message="final evaluation")
    stop = run.flags.stop_requested
    batch = run.spec.training.per_device_batch_size
    pad = tokenizer.pad_token_id
    try:
        if stop():
            raise evaluate.ScoringInterrupted
        cand = evaluate.score_rows(model, eval_data.rows, pad, batch_size=batch, should_stop=stop)
        scores = {run.spec.name: cand}
        baseline_label = None
        if policy == "if_better":
            baseline_label, baseline = _baseline_adapter(run, revision)
            if baseline is None:
                with model.disable_adapter():
                    scores[evaluate.BASE] = evaluate.score_rows(model, eval_data.rows, pad, batch_size=batch,
                                                                should_stop=stop)
            else:
                model.load_adapter(str(baseline.path), adapter_name=evaluate.BASELINE_ADAPTER)
                try:
                    with evaluate.as_model(model, evaluate.BASELINE_ADAPTER):
                        scores[baseline_label] = evaluate.score_rows(model, eval_data.rows, pad, batch_size=batch,
                                                                     should_stop=stop)
                finally:
                    model.delete_adapter(evaluate.BASELINE_ADAPTER)
    except evaluate.ScoringInterrupted:
        raise _GateInterrupted from None
    promotion["candidate_loss"] = cand["loss"]
    promotion["candidate_token_accuracy"] = cand["token_accuracy"]
    if policy == "if_better":
        base_loss = scores[baseline_label]["loss"]
        promotion.update(baseline=baseline_label, baseline_loss=base_loss,
                         verdict="promoted" if evaluate.verdict(cand["loss"], base_loss) else "kept")
    else:
        promotion["verdict"] = "skipped" if policy == "never" else "promoted"
    return promotion, scores


def _baseline_adapter(run: _Run, revision: str | None) -> tuple[str, Any]:
    """(label, Adapter or None): what a new version must beat, the current LATEST if it is on this base."""
    from lorastack import evaluate

    with contextlib.suppress(StoreError):
        latest = run.store.adapter(run.spec.name)  # verified
        if latest.base_model == str(run.spec.base_model) and (
            revision is None or latest.base_revision in (None, revision)
        ):
            return latest.ref, latest
        log.info("LATEST %s is on another base model: comparing against the base model instead", latest.ref)
    return evaluate.BASE, None


def _load_best(run: _Run, model: Any) -> dict[str, Any] | None:
    """With keep_best: put the best evaluation's adapter weights (runs/<id>/best/) back into ``model``."""
    best = run.store.run_dir(run.run_id) / BEST_DIR
    info_file = best / "best.json"
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text(encoding="utf-8"))
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(best / "adapter_model.safetensors")))
    log.info("keep_best: publishing the weights of step %d (validation loss %.4f)", info["step"], info["eval_loss"])
    return {"best_step": info["step"], "best_valid_loss": info["eval_loss"]}


def _build_run_trainer(
    run: _Run,
    monitor: _RunMonitor,
    model: Any,
    tokenizer: Any,
    train_data: EncodedData,
    eval_data: EncodedData | None,
) -> Any:
    """The SFT trainer for this run: checkpoints under runs/<id>/checkpoints, reporting to ``monitor``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    ckpt_root = run.store.checkpoints_dir(run.run_id)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    trainer = build_sft_trainer(
        run.spec,
        model,
        tokenizer,
        train_data.rows,
        eval_data.rows if eval_data else None,
        ckpt_root,
        interactive=run.interactive,
        callbacks=[monitor.trainer_callback()],
    )
    monitor.trainer = trainer
    # HF's own printers dump raw dicts ({'loss': ...}) on stdout and draw bars for evaluations; ours is one bar.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if run.interactive:
        trainer.add_callback(monitor.progress_bar_callback())
    log.debug(
        "model: %s non-embedding params (6N = %.3g FLOP/token); device %s; packing %s",
        f"{monitor.n_params:,}",
        6 * monitor.n_params,
        trainer.args.device,
        run.spec.training.packing,
    )
    return trainer


def _stopped(run: _Run, reason: str, step: int, metrics: dict[str, Any]) -> Outcome:
    """The run stopped itself with a checkpoint: on a signal (preempted) or before the time budget ran out."""
    if reason == "signal":
        phase, code = _signal_outcome(run.flags)
        what = f"stopped by {run.flags.signal_name} at step {step}"
    else:
        phase, code, what = "stopped", EXIT_TIME_BUDGET, f"stopped: time budget (step {step})"
    run.reporter.update(
        phase, step=step, message=f"{what}; checkpoint saved, rerun to resume", finished_at=utc_now()
    )
    if reason == "time_budget":
        log.info("stopped: time budget at step %d; rerun the same command to continue", step)
    return Outcome(phase, code, metrics=metrics)


class _RunMonitor:
    """Watches the training loop: throughput, status.json and results.csv, and when to checkpoint or stop.

    Checkpoints are saved on the time cadence (``save_every_minutes``), on a signal, and before the time
    budget runs out; each is marked COMPLETE (trusted) only once whole, then old ones are rotated. Each
    checkpoint records the run's cumulative metrics (tokens, runtime, first loss) and early-stopping state,
    so a resumed run reports what an uninterrupted one would. ``trainer_callback()`` forwards the
    transformers Trainer's events here.
    """

    def __init__(self, run: _Run, n_params: int, peak_flops: float | None, prior: dict[str, Any] | None = None):
        t = run.spec.training
        prior = prior or {}
        self.run = run
        self.n_params = n_params
        self.peak = peak_flops
        self.budget = float(run.spec.time_budget) if run.spec.time_budget else None
        self.save_every = t.save_every_minutes * 60
        self.keep = t.save_total_limit
        self.trainer: Any = None  # set once built; its token counters feed tokens/s
        self.last_save = time.monotonic()
        self.attempt_t0 = time.monotonic()
        self.save_t0: float | None = None
        self.save_s = 0.0  # how long the last checkpoint took to write
        self.step_t0: float | None = None
        self.max_step_s = 0.0
        self.train_s = 0.0  # time spent inside training steps (not evaluation or saving)
        self.stop_reason: str | None = None  # "signal" | "time_budget" | "early_stopping"
        self.training_done = False
        # Cumulative across attempts, as of the checkpoint this attempt resumed from.
        done = prior.get("metrics") or {}
        self.prior_tokens = int(done.get("trained_tokens") or 0)
        self.prior_loss_tokens = int(done.get("loss_tokens") or 0)
        self.prior_runtime = float(done.get("train_runtime_s") or 0.0)
        self.prior_attempts = int(done.get("attempts") or 0)
        self.first_loss: float | None = done.get("first_loss")
        self.last_loss: float | None = done.get("last_loss")
        es = prior.get("early_stopping") or {}
        self.best_loss: float | None = es.get("best_eval_loss")
        self.best_step: int | None = es.get("best_step")
        self.evals_since_best = int(es.get("evals_since_best") or 0)
        self.bar: Any = None

    def trainer_callback(self) -> Any:
        """A transformers TrainerCallback that forwards the loop's events to this monitor."""
        from transformers import TrainerCallback

        monitor = self

        class RunCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                monitor.step_began()

            def on_step_end(self, args, state, control, **kw):
                return monitor.step_ended(state, control)

            def on_epoch_end(self, args, state, control, **kw):
                if monitor.run.flags.stop_requested():
                    control.should_evaluate = False  # answer the signal first; no evaluation before exiting
                return control

            def on_prediction_step(self, args, state, control, **kw):
                if monitor.run.flags.stop_requested():
                    raise _EvalInterrupted

            def on_evaluate(self, args, state, control, metrics=None, **kw):
                return monitor.evaluated(state, control, metrics or {})

            def on_save(self, args, state, control, **kw):
                monitor.saved(Path(args.output_dir) / f"checkpoint-{state.global_step}")

            def on_log(self, args, state, control, logs=None, **kw):
                monitor.logged(state, logs or {})

        return RunCallback()

    def progress_bar_callback(self) -> Any:
        """One tqdm bar on stderr for the run: step, ETA, loss and tokens/s (evaluations draw no bar)."""
        from transformers import TrainerCallback

        monitor = self

        class ProgressBar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                from tqdm.auto import tqdm

                monitor.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training",
                                   unit="step", file=sys.stderr, dynamic_ncols=True)

            def on_step_end(self, args, state, control, **kw):
                if monitor.bar is not None:
                    monitor.bar.update(state.global_step - monitor.bar.n)

            def on_train_end(self, args, state, control, **kw):
                if monitor.bar is not None:
                    monitor.bar.close()
                    monitor.bar = None

        return ProgressBar()

    def step_began(self) -> None:
        self.step_t0 = time.monotonic()

    def step_ended(self, state: Any, control: Any) -> Any:
        """Time the step; ask for a checkpoint (and a stop) on a signal, the budget or the save cadence."""
        now = time.monotonic()
        if self.step_t0 is not None:
            dt = now - self.step_t0
            self.train_s += dt
            self.max_step_s = max(self.max_step_s, dt)
        if self.run.flags.signal_name:
            self.stop_reason = "signal"
            control.should_save = control.should_training_stop = True
            control.should_evaluate = False  # an evaluation would delay the exit past the grace period
            self.training_done = state.max_steps > 0 and state.global_step >= state.max_steps
        elif self.budget is not None:
            # Leave room for one more step, a checkpoint save and a margin before the budget ends.
            reserve = 2 * self.max_step_s + max(self.save_s * 1.5, 1.0) + min(60.0, 0.05 * self.budget)
            if now - self.run.started + reserve >= self.budget and state.global_step < state.max_steps:
                self.stop_reason = "time_budget"
                control.should_save = control.should_training_stop = True
        if self.save_every and now - self.last_save >= self.save_every:
            control.should_save = True
        if distributed.is_distributed():  # every rank saves and stops at the same step
            self.stop_reason, control.should_save, control.should_training_stop = distributed.agree_stop(
                self.stop_reason, control.should_save, control.should_training_stop)
        if control.should_save:
            self.save_t0 = now
        return control

    def cumulative(self) -> dict[str, Any]:
        """Metrics summed over every attempt up to now (what a checkpoint records and the manifest shows)."""
        tr = self.trainer
        return {
            "trained_tokens": self.prior_tokens + (tr.trained_tokens if tr is not None else 0),
            "loss_tokens": self.prior_loss_tokens + (tr.loss_tokens if tr is not None else 0),
            "train_runtime_s": round(self.prior_runtime + (time.monotonic() - self.attempt_t0), 2),
            "attempts": self.prior_attempts + 1,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
        }

    def saved(self, ckpt: Path) -> None:
        """A checkpoint was written: record what it was trained from, mark it COMPLETE, rotate old ones."""
        run = self.run
        distributed.barrier()  # every rank has written its part of the checkpoint (RNG state) first
        if ckpt.is_dir() and distributed.is_main():
            write_json_atomic(
                ckpt / IDENTITY_FILE,
                {
                    "run_id": run.run_id,
                    "spec": run.doc,
                    "saved_at": utc_now(),
                    "metrics": self.cumulative(),
                    "training_done": self.training_done,
                    "fast_path": run.fast_path,
                    "early_stopping": {"best_eval_loss": self.best_loss, "best_step": self.best_step,
                                       "evals_since_best": self.evals_since_best},
                },
            )
            Store.mark_complete(ckpt)  # written last: from here on the checkpoint is trusted
            _rotate_checkpoints(run.store, run.run_id, self.keep)
        self.last_save = time.monotonic()
        self.save_s = self.last_save - (self.save_t0 if self.save_t0 is not None else self.last_save)
        run.reporter.update(checkpoint=ckpt.name, checkpoint_at=utc_now())

    def tokens_per_s(self) -> float:
        return self.trainer.trained_tokens / self.train_s if self.train_s > 0 else 0.0

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation (6N FLOPs per token) against the GPU's datasheet peak; None off GPU."""
        return tokens_per_s * 6 * self.n_params / self.peak if self.peak else None

    def evaluated(self, state: Any, control: Any, metrics: dict[str, Any]) -> Any:
        """A mid-training evaluation: results.csv, early stopping, and the best weights (keep_best)."""
        if "eval_loss" not in metrics:
            return control
        step, loss = state.global_step, float(metrics["eval_loss"])
        reporter = self.run.reporter
        reporter.record(step, valid_loss=loss,
                        validation_mean_token_accuracy=_f(metrics.get("eval_mean_token_accuracy")))
        reporter.update(valid_loss=loss)
        self.run.emit(f"step {step} valid_loss {loss:.4f}", always=True)
        t = self.run.spec.training
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            if t.keep_best:
                self._save_best(step, loss)
        else:
            self.evals_since_best += 1
            if t.early_stopping_patience and self.evals_since_best >= t.early_stopping_patience:
                self.stop_reason = "early_stopping"
                self.training_done = True
                control.should_training_stop = True
        return control

    def _save_best(self, step: int, loss: float) -> None:
        best = self.run.store.run_dir(self.run.run_id) / BEST_DIR
        staging = best.with_name(f".tmp-best-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        self.trainer.model.save_pretrained(staging)
        write_json_atomic(staging / "best.json", {"step": step, "eval_loss": loss})
        old = best.with_name(f".tmp-oldbest-{os.getpid()}")
        if best.exists():
            os.rename(best, old)
        os.rename(staging, best)
        shutil.rmtree(old, ignore_errors=True)

    def logged(self, state: Any, logs: dict[str, Any]) -> None:
        """A training log: results.csv, status.json, the progress bar and a readable line."""
        if "loss" in logs:
            self._log_train(state, logs)

    def _log_train(self, state: Any, logs: dict[str, Any]) -> None:
        step, loss = state.global_step, float(logs["loss"])
        toks = self.prior_tokens + self.trainer.trained_tokens
        tps = self.tokens_per_s()
        mfu = self.mfu(tps)
        self.last_loss = loss
        if self.first_loss is None:
            self.first_loss = loss
        reporter = self.run.reporter
        reporter.record(step, train_loss=loss, train_mean_token_accuracy=_f(logs.get("mean_token_accuracy")))
        reporter.update(
            "training",
            step=step,
            max_steps=state.max_steps,
            epoch=_f(state.epoch),
            loss=loss,
            learning_rate=_f(logs.get("learning_rate")),
            tokens_per_s=round(tps, 1),
            mfu=round(mfu, 4) if mfu is not None else None,
            trained_tokens=toks,
            elapsed_s=round(time.monotonic() - self.run.started, 1),
            message=None,
        )
        mfu_txt = f" MFU {mfu:.1%}" if mfu is not None else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} {tps:,.0f} tok/s{mfu_txt}", refresh=False)
        self.run.emit(
            f"step {step}/{state.max_steps} loss {logs['loss']:.4f} "
            f"acc {logs.get('mean_token_accuracy', float('nan')):.3f} {tps:,.0f} tok/s{mfu_txt}"
        )

    def metrics(self, wall: float) -> dict[str, Any]:
        """The run's metrics once training returned: cumulative over every attempt (also logged)."""
        tr = self.trainer
        tps = tr.trained_tokens / self.train_s if self.train_s else 0.0
        total = self.cumulative()
        total["train_runtime_s"] = round(self.prior_runtime + wall, 2)
        metrics = {
            **total,
            "steps": tr.state.global_step,
            "global_step": tr.state.global_step,
            "train_loss": self.last_loss,
            "first_train_loss": self.first_loss,
            "eval_loss": None,
            "tokens_per_s": round(tps, 1),
            "non_embedding_params": self.n_params,
        }
        if self.peak:
            metrics["mfu"] = round(self.mfu(tps), 4)
        if tr.trained_tokens:
            log.info(
                "trained %s tokens in %.1fs of steps (%s in all attempts): %.0f tok/s%s",
                f"{tr.trained_tokens:,}",
                self.train_s,
                f"{total['trained_tokens']:,}",
                tps,
                f", MFU {metrics['mfu']:.1%}" if self.peak else "",
            )
        return metrics


def _f(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


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
    spec: RunSpec,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    output_dir: Path,
    *,
    interactive: bool = False,
    callbacks: list | None = None,
) -> Any:
    """A TRL SFTTrainer for a 4-bit base + LoRA on pre-tokenized rows (``input_ids`` + ``labels``).

    ``spec`` has its fast-path settings resolved (:func:`choose_fast_path`, or explicit in the spec)."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    # transformers 5 renames gradient_checkpointing* to activation_checkpointing* in v6; TRL/peft still
    # use the old names, so the FutureWarning is noise for our users.
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing\w*` is deprecated", category=FutureWarning
    )
    unresolved = [k for k in ("packing", "gradient_checkpointing", "row_len") if getattr(spec.training, k) == "auto"]
    if unresolved:
        raise ValueError(f"training.{', training.'.join(unresolved)} still 'auto': resolve with choose_fast_path")
    model = _with_lora(model, spec)
    has_eval = bool(eval_rows)
    packing, row_len = spec.training.packing, spec.training.row_len
    dtype = models.compute_dtype(spec.quantization.compute_dtype)
    trainer = _counting_trainer_class(SFTTrainer)(
        model=model,
        args=_sft_config(spec, output_dir, dtype, has_eval=has_eval, interactive=interactive),
        train_dataset=Dataset.from_list(pack_rows(train_rows, row_len) if packing else train_rows),
        eval_dataset=(
            Dataset.from_list(pack_rows(eval_rows, row_len) if packing else eval_rows) if has_eval else None
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


_GC_KWARGS = {"use_reentrant": False}  # non-reentrant gradient checkpointing (works with frozen 4-bit inputs)


def _with_lora(model: Any, spec: RunSpec) -> Any:
    """The base prepared for k-bit training (if quantized) and wrapped in the spec's LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(_GC_KWARGS),
        )
    lo = spec.lora
    lora = LoraConfig(
        r=lo.r,
        lora_alpha=int(lo.alpha),
        lora_dropout=float(lo.dropout),
        target_modules=lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    _keep_4bit_weights_trainable_on_cpu(model)
    return model


def _sft_config(spec: RunSpec, output_dir: Path, dtype: Any, *, has_eval: bool, interactive: bool) -> Any:
    """The spec's training settings as a TRL SFTConfig."""
    import torch
    from trl import SFTConfig

    t = spec.training
    on_cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=t.max_steps,  # -1 = use epochs
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_ratio,  # a value below 1 is a ratio of the steps
        lr_scheduler_type=t.lr_scheduler,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        # eval_steps null = once per epoch
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps if has_eval and t.eval_steps else None,
        # Saving is driven by the time cadence and signals (see _RunMonitor), not by steps.
        save_strategy="no",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs=dict(_GC_KWARGS),
        max_length=spec.max_seq_len,
        # Packing is done here (lorastack.packing), not by TRL: TRL's padding-free mode flattens the whole
        # micro-batch into one row, so attention costs (batch * max_len)^2 under SDPA; keeping one packed
        # row per batch item costs batch * max_len^2.
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


# ---------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------
def publish(
    store: Store,
    run_id: str,
    spec: RunSpec,
    doc: dict[str, Any],
    model: Any,
    tokenizer: Any,
    revision: str | None,
    metrics: dict[str, Any],
    *,
    promotion: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    fast_path: dict[str, Any] | None = None,
) -> Any:
    """Save adapter + tokenizer + chat template + model card to a scratch dir, then publish it atomically.

    LATEST moves only when ``promotion["verdict"]`` is "promoted" (no promotion given: promoted). Publishing
    is idempotent per run (see Store.publish_adapter). With ``evaluation`` (the gate's scores), eval.json is
    written next to the version for the UI. ``fast_path`` (what the spec's "auto" settings resolved to) goes into
    the manifest.
    """
    from lorastack.model_card import render_model_card

    template = tokenizer.chat_template
    promotion = promotion or {"policy": "always", "verdict": "promoted"}
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
            "promotion": promotion,
            "system_prompt": _system_prompt(store, doc),
        }
        if fast_path:
            manifest["fast_path"] = fast_path
        if doc.get("holdout"):
            manifest["holdout"] = doc["holdout"]
        datasets = {role: _dataset_facts(store, sha) for role, sha in doc["dataset_sha256"].items()}
        # peft writes an empty model-card template; ours says what this adapter is and how to load it.
        (out / "README.md").write_text(
            render_model_card(str(spec.name), manifest, datasets, evaluation), encoding="utf-8"
        )
        adapter = store.publish_adapter(
            str(spec.name), out, manifest, promote=promotion.get("verdict") == "promoted",
            reason=_promotion_reason(promotion),
        )
    if evaluation and len(evaluation) > 1 and not (adapter.path / "eval.json").exists():
        _write_gate_eval(store, adapter, doc, evaluation)
    return adapter


def _dataset_facts(store: Store, digest: str) -> dict[str, Any]:
    try:
        path = store.dataset_path(digest)
    except StoreError:
        return {"sha256": digest}
    examples = sum(1 for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())
    return {"sha256": digest, "bytes": path.stat().st_size, "examples": examples}


def _system_prompt(store: Store, doc: dict[str, Any]) -> str | None:
    """The training data's system prompt: the most common first system message, if the data has one."""
    from collections import Counter

    with contextlib.suppress(StoreError, OSError, ValueError):
        path = store.dataset_path(doc["dataset_sha256"]["training"])
        seen: Counter[str] = Counter()
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                messages = json.loads(line).get("messages") or []
                if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
                    seen[messages[0]["content"]] += 1
        if seen:
            return seen.most_common(1)[0][0]
    return None


def _write_gate_eval(store: Store, adapter: Any, doc: dict[str, Any], scores: dict[str, Any]) -> None:
    """eval.json (CONTRACTS.md shape) from the promotion gate's scores; `lorastack eval` adds samples."""
    from lorastack.store import EVAL_FILE

    digest = doc["dataset_sha256"].get("validation")
    labels = list(scores)
    against = next((lbl for lbl in labels if lbl != adapter.name), "base")
    metrics = {(adapter.ref if lbl == adapter.name else lbl): {**m, "chrf": None} for lbl, m in scores.items()}
    write_json_atomic(adapter.path / EVAL_FILE, {
        "adapter": adapter.ref,
        "against": against if against in metrics else "base",
        "data": [{"path": f"datasets/{digest}.jsonl", "sha256": digest}] if digest else [],
        "metrics": metrics,
        "samples": [],
        "created_at": utc_now(),
    })


def merge_16bit(store: Store, run_id: str, spec: RunSpec, adapter_dir: Path) -> Path:
    """Merge the adapter into a 16-bit copy of the base (never into 4-bit weights); save runs/<id>/merged/."""
    import gc

    import torch
    from peft import PeftModel

    gc.collect()
    # 16-bit even on CPU: bf16 unless the GPU lacks it (T4)
    on_gpu_without_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    base, _ = load_base_model(
        spec, store, quantize=False, compute_dtype="float16" if on_gpu_without_bf16 else "bfloat16"
    )
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
