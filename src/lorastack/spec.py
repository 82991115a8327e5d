"""The run spec (``jobs/<name>.yaml``): one typed model of every fine-tuning option, validated once.

A spec names the adapter, the base model (+ revision), the training and validation files (paths are
relative to the spec file), LoRA and quantization settings, training hyperparameters, the maximum
sequence length and a wall-clock budget. Unknown keys are errors (a typo must never be silently
ignored); every error names the file, the dotted key and what is allowed::

    jobs/x.yaml: lora.r: must be a positive integer, got 'abc'
    jobs/x.yaml: trainng: unknown key (did you mean 'training'?)

``load_spec(path, overrides)`` applies CLI overrides (``--set lora.r=32`` and the ``--base-model``,
``--max-steps``, ``--epochs``, ``--time-budget`` shortcuts, see :func:`spec_overrides_from_args`)
before validation. ``RunSpec.fingerprint()`` hashes what determines the trained weights (the resolved
spec plus the datasets' sha256) so a retried job resumes the same run and a changed spec does not.

Only pydantic, PyYAML and the standard library are imported here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from lorastack.store import StoreError, check_name, sha256_file


class SpecError(ValueError):
    """A run spec is unreadable or invalid. ``problems`` holds one ``file: key: message`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _allowed(text: str) -> dict[str, Any]:
    # Shown in error messages as "must be <text>".
    return {"allowed": text}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    """LoRA adapter shape (PEFT ``LoraConfig``)."""

    r: int = Field(
        16,
        strict=True,
        gt=0,
        description="LoRA rank: size of the low-rank update matrices.",
        json_schema_extra=_allowed("a positive integer"),
    )
    alpha: float = Field(
        32,
        strict=True,
        gt=0,
        description="LoRA alpha; the update is scaled by alpha / r.",
        json_schema_extra=_allowed("a positive number"),
    )
    dropout: float = Field(
        0.05,
        strict=True,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input, in [0, 1).",
        json_schema_extra=_allowed("a number in [0, 1)"),
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the output head) or "
        "a list of module names, e.g. [q_proj, v_proj].",
        json_schema_extra=_allowed("'all-linear' or a list of module names"),
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or not all(isinstance(m, str) and m for m in v)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return v


class QuantizationSettings(_Section):
    """How the frozen base model is loaded (bitsandbytes ``BitsAndBytesConfig``)."""

    load_in_4bit: bool = Field(
        True,
        strict=True,
        description="Load the base model in 4 bits (QLoRA). false = 16-bit LoRA.",
        json_schema_extra=_allowed("true or false"),
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA) or fp4.")
    double_quant: bool = Field(
        True,
        strict=True,
        description="Also quantize the quantization constants (saves ~0.37 bit/param).",
        json_schema_extra=_allowed("true or false"),
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the matmuls: auto = bfloat16 where the GPU or CPU has it (AVX512-BF16 / AMX), "
        "float16 on older GPUs (T4), else float32.",
    )


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class TrainingSettings(_Section):
    """Optimisation and checkpointing (maps onto TRL ``SFTConfig`` / transformers ``TrainingArguments``)."""

    epochs: float = Field(
        3.0,
        strict=True,
        gt=0,
        description="Passes over the training data (ignored when max_steps > 0). "
        "`lorastack validate` suggests a value for the dataset size.",
        json_schema_extra=_allowed("a positive number"),
    )
    max_steps: int = Field(
        -1,
        strict=True,
        ge=-1,
        description="Stop after this many optimizer steps; -1 = use epochs.",
        json_schema_extra=_allowed("-1 or a positive integer"),
    )
    learning_rate: float = Field(
        2e-4,
        strict=True,
        gt=0,
        description="Peak learning rate.",
        json_schema_extra=_allowed("a positive number"),
    )
    per_device_batch_size: int = Field(
        4,
        strict=True,
        gt=0,
        description="Sequences (or packed rows) per device per micro-step.",
        json_schema_extra=_allowed("a positive integer"),
    )
    gradient_accumulation_steps: int = Field(
        4,
        strict=True,
        gt=0,
        description="Micro-steps per optimizer step.",
        json_schema_extra=_allowed("a positive integer"),
    )
    warmup_ratio: float = Field(
        0.03,
        strict=True,
        ge=0,
        lt=1,
        description="Fraction of steps for linear LR warm-up.",
        json_schema_extra=_allowed("a number in [0, 1)"),
    )
    lr_scheduler: LrScheduler = Field("cosine", description="Learning-rate schedule after warm-up.")
    seed: int = Field(
        42,
        strict=True,
        ge=0,
        description="Random seed (data order, LoRA init, dropout).",
        json_schema_extra=_allowed("a non-negative integer"),
    )
    # "auto" = lorastack.train_defaults picks from the device, its memory and the model, once per run; the
    # run's log, status and adapter manifest say what it picked and why (a resumed run keeps the same).
    packing: StrictBool | Literal["auto"] = Field(
        "auto",
        description="Pack several examples into one row (BFD, no cross-attention). auto = on.",
        json_schema_extra=_allowed("true, false or auto"),
    )
    row_len: StrictInt | Literal["auto"] = Field(
        "auto",
        description="Tokens per packed row (micro-batches keep per_device_batch_size x max_seq_len tokens). "
        "auto = 256 on CPU (never shorter than the longest example), max_seq_len on a GPU; at most max_seq_len.",
        json_schema_extra=_allowed("a positive integer or auto"),
    )
    gradient_checkpointing: StrictBool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory. "
        "auto = off when the activations fit in the device's memory, else on.",
        json_schema_extra=_allowed("true, false or auto"),
    )
    logging_steps: int = Field(
        10,
        strict=True,
        gt=0,
        description="Log metrics (results.csv, status.json) every N optimizer steps.",
        json_schema_extra=_allowed("a positive integer"),
    )
    eval_steps: int | None = Field(
        None,
        strict=True,
        gt=0,
        description="Evaluate on the validation file every N steps; "
        "null = once per epoch. Ignored without a validation file.",
        json_schema_extra=_allowed("a positive integer or null"),
    )
    save_every_minutes: float = Field(
        10.0,
        strict=True,
        gt=0,
        description="Write a checkpoint at least this often (wall clock), "
        "so a preempted job loses little work.",
        json_schema_extra=_allowed("a positive number of minutes"),
    )
    save_total_limit: int = Field(
        2,
        strict=True,
        gt=0,
        description="Keep at most this many complete checkpoints.",
        json_schema_extra=_allowed("a positive integer"),
    )

    holdout: float = Field(
        0.1,
        strict=True,
        ge=0,
        lt=0.5,
        description="Without a validation file, hold out this fraction of the training examples (seeded by "
        "`seed`; at least one, never leaving fewer than the 10-example training minimum) to evaluate on. "
        "0 = no hold-out.",
        json_schema_extra=_allowed("a number in [0, 0.5)"),
    )
    early_stopping_patience: int | None = Field(
        None,
        strict=True,
        gt=0,
        description="Stop once the validation loss has not improved for this many evaluations; null = never.",
        json_schema_extra=_allowed("a positive integer or null"),
    )
    keep_best: bool = Field(
        False,
        strict=True,
        description="Publish the weights of the evaluation with the lowest validation loss, not the last step.",
        json_schema_extra=_allowed("true or false"),
    )
    keep_checkpoints: int = Field(
        0,
        strict=True,
        ge=0,
        description="Checkpoints kept after a successful publish (0 = delete them all).",
        json_schema_extra=_allowed("a non-negative integer"),
    )

    @field_validator("max_steps")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (use epochs) or a positive integer, got 0")
        return v

    @field_validator("row_len")
    @classmethod
    def _positive_row(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"must be a positive integer or auto, got {v}")
        return v


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any) -> int:
    """Seconds in a duration such as ``"45m"``, ``"2h"``, ``"1h30m"``, ``"90s"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like '45m', '2h' or '1h30m'")  # noqa: TRY004 (pydantic reports ValueError only)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_DURATION_RE.pattern})+", text, re.IGNORECASE):
            seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION_RE.findall(text))
        else:
            raise ValueError(f"must be a duration like '45m', '2h' or '1h30m', got {value!r}")
    else:
        raise ValueError(f"must be a duration like '45m', '2h' or '1h30m', got {value!r}")  # noqa: TRY004 (pydantic reports ValueError only)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return round(seconds)


class SweepSettings(_Section):
    """A hyperparameter sweep (``lorastack finetune --engine aml``): each list is the values to try."""

    learning_rate: list[float] | None = Field(None, description="Learning rates to try.")
    lora_r: list[int] | None = Field(None, description="LoRA ranks to try.")
    epochs: list[float] | None = Field(None, description="Epoch counts to try.")
    sampling: Literal["grid", "random", "bayesian"] = Field("grid", description="How trials are picked.")
    max_trials: int = Field(8, strict=True, gt=0, description="Trials at most.")
    max_concurrent_trials: int = Field(2, strict=True, gt=0, description="Trials running at once at most.")


# Fields that do not change the trained weights: a retried job with a different value resumes the run.
FINGERPRINT_EXCLUDES = (
    "description",
    "sweep",  # each trial is its own run, with the swept values set in its spec
    "time_budget",
    "merge_16bit",
    "training.logging_steps",
    "training.save_every_minutes",
    "training.save_total_limit",
    "training.keep_checkpoints",
    "promote",
)

PromotePolicy = Literal["always", "if_better", "never"]


class RunSpec(_Section):
    """One fine-tune: ``jobs/<name>.yaml``. Load it with :func:`load_spec`."""

    name: str = Field(
        ..., description="Adapter name in the store: 1-63 lowercase letters, digits, '.', '_' or '-'."
    )
    description: str | None = Field(None, description="Free text for humans; not used by the trainer.")
    base_model: str = Field(
        ...,
        min_length=1,
        description="Hugging Face model id or local directory of the base model.",
        json_schema_extra=_allowed("a model id like 'microsoft/Phi-3-mini-4k-instruct' or a directory"),
    )
    base_revision: str = Field(
        "main", min_length=1, description="Git revision (branch, tag or commit) of the base model."
    )
    training_file: Path = Field(
        ..., description="Chat JSONL training data (Azure/OpenAI format), relative to the spec file."
    )
    validation_file: Path | None = Field(
        None, description="Optional chat JSONL validation data, relative to the spec file."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter shape.")
    quantization: QuantizationSettings = Field(
        default_factory=QuantizationSettings, description="Base-model loading."
    )
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Hyperparameters and checkpointing."
    )
    max_seq_len: int = Field(
        2048,
        strict=True,
        gt=0,
        description="Token limit per example; longer ones lose their oldest turns, never the final answer.",
        json_schema_extra=_allowed("a positive integer"),
    )
    time_budget: int | None = Field(
        None,
        strict=True,
        description="Wall-clock budget ('45m', '2h', '1h30m'; stored in seconds): "
        "checkpoint and stop before it runs out. null = no limit.",
        json_schema_extra=_allowed("a duration like '45m', '2h' or '1h30m'"),
    )
    merge_16bit: bool = Field(
        False,
        strict=True,
        description="Also write the adapter merged into a 16-bit copy of the base model.",
        json_schema_extra=_allowed("true or false"),
    )
    promote: PromotePolicy | None = Field(
        None,
        description="Whether a finished run's version becomes LATEST (what is served): always; if_better = only "
        "if its validation loss beats the current LATEST (or the base model when there is none) on the same "
        "data; never = publish only (promote by hand). null = if_better with validation data, else always.",
    )
    sweep: SweepSettings | None = Field(
        None, description="Hyperparameter sweep on Azure ML (`--engine aml`): the best trial's adapter is published."
    )

    _spec_path: Path | None = PrivateAttr(None)
    _hashes: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _store_name(cls, v: str) -> str:
        try:
            return check_name(v)
        except StoreError:
            raise ValueError(
                f"must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, got {v!r}"
            ) from None

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    # -- derived values -------------------------------------------------------------------------
    def promote_policy(self, has_validation: bool) -> str:
        """The promotion policy in force: the spec's, else if_better with validation data, else always."""
        return self.promote or ("if_better" if has_validation else "always")

    @property
    def spec_path(self) -> Path | None:
        """The YAML file this spec was loaded from (None if built in code)."""
        return self._spec_path

    def data_files(self) -> dict[str, Path]:
        """{'training': path, 'validation': path} for the files this spec names."""
        files = {"training": self.training_file}
        if self.validation_file is not None:
            files["validation"] = self.validation_file
        return files

    def dataset_hashes(self) -> dict[str, str]:
        """sha256 of each data file (cached: datasets are treated as immutable during a run)."""
        for role, path in self.data_files().items():
            if role not in self._hashes:
                self._hashes[role] = sha256_file(Path(path))
        return dict(self._hashes)

    def resolved_dict(self) -> dict[str, Any]:
        """Every option with defaults filled in, JSON/YAML-safe (paths as strings, time_budget in seconds).

        This is what lands in ``runs/<run-id>/spec.yaml``; :func:`load_spec` reads it back unchanged.
        """
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """``resolved_dict()`` as YAML text."""
        return yaml.safe_dump(self.resolved_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Hex sha256 of what determines the trained weights: the resolved spec and the datasets' hashes.

        Data file *paths* and the options in FINGERPRINT_EXCLUDES (budget, logging, checkpoint cadence)
        are left out, so the same job retried elsewhere, or with a longer budget, maps to the same run.
        """
        d = self.resolved_dict()
        d.pop("training_file", None)
        d.pop("validation_file", None)
        for dotted in FINGERPRINT_EXCLUDES:
            *parents, leaf = dotted.split(".")
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        d["datasets"] = self.dataset_hashes()
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def run_id(self) -> str:
        """A store-safe run id: ``<name>-<first 12 hex of fingerprint>``."""
        return f"{self.name[:50]}-{self.fingerprint()[:12]}"


# -- loading --------------------------------------------------------------------------------------


def _expand_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{'lora.r': 32, 'training': {'seed': 1}} -> {'lora': {'r': 32}, 'training': {'seed': 1}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            value = _expand_dotted(value)
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        keys.add(key)
        if isinstance(v, Mapping):
            keys |= _flat_keys(v, key + ".")
    return keys


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the field at ``loc[:-1]`` (for listing allowed keys)."""
    model: type[BaseModel] = RunSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _format_error(err: dict[str, Any]) -> str:
    # union/literal branches add their type names to the location; keep only real keys
    parts: list[str] = []
    model: type[BaseModel] | None = RunSpec
    for p in err.get("loc", ()):
        if isinstance(p, str) and model is not None and p in model.model_fields:
            parts.append(p)
            ann = model.model_fields[p].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif isinstance(p, int):
            parts.append(f"[{p}]")
        elif model is not None and err["type"] == "extra_forbidden":
            parts.append(p)
        else:
            break
    dotted = ".".join(parts).replace(".[", "[")
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        holder = _model_at(tuple(parts)) or RunSpec
        allowed = list(holder.model_fields)
        close = difflib.get_close_matches(str(parts[-1]), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed keys: {', '.join(allowed)}"
        return f"{dotted}: unknown key{hint}"
    if kind == "missing":
        return f"{dotted}: missing (required)"
    holder = _model_at(tuple(parts))
    field = holder.model_fields.get(parts[-1]) if holder and parts else None
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    msg = err.get("msg", "")
    if kind in ("value_error", "assertion_error"):
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if dotted and msg.startswith(dotted + ": "):
            return msg
        return f"{dotted}: {msg}" if dotted else msg
    branch = len([p for p in err.get("loc", ()) if not isinstance(p, int)]) > len(
        [p for p in parts if not p.startswith("[")]
    )
    if branch and "allowed" in extra:  # a union: one message for the field, not one per branch
        return f"{dotted}: must be {extra['allowed']}, got {value!r}"
    if kind.startswith("literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{dotted}: must be one of {expected}, got {value!r}"
    if "allowed" in extra:
        return f"{dotted}: must be {extra['allowed']}, got {value!r}"
    return f"{dotted}: {msg[0].lower() + msg[1:] if msg else kind}, got {value!r}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """Read, override and validate a run spec; data paths are resolved relative to the spec file.

    ``overrides`` is a nested dict or dotted keys (``{"lora.r": 32}``), applied on top of the file.
    Raises :class:`SpecError` listing every problem as ``<file>: <dotted.key>: <what is allowed>``,
    including data files that do not exist.
    """
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError([f"{where}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{where}: cannot read: {exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise SpecError([f"{where}: {line}invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(
            [f"{where}: must be a mapping of keys (name:, base_model:, ...), got {type(raw).__name__}"]
        )
    extra = _expand_dotted(overrides or {})
    overridden = _flat_keys(extra)
    data = _deep_merge(raw, extra)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for err in exc.errors():
            line = _format_error(err)
            key = line.split(":", 1)[0]
            origin = " (set on the command line)" if key in overridden else ""
            if f"{where}: {line}{origin}" not in problems:
                problems.append(f"{where}: {line}{origin}")
        raise SpecError(problems) from None
    base = path.resolve().parent
    problems = []
    for key in ("training_file", "validation_file"):
        value = getattr(spec, key)
        if value is None:
            continue
        resolved = value if value.is_absolute() else (base / value)
        resolved = resolved.resolve()
        if not resolved.is_file():
            problems.append(f"{where}: {key}: file not found: {resolved}")
        setattr(spec, key, resolved)
    if problems:
        raise SpecError(problems)
    spec._spec_path = path.resolve()
    return spec


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """``["lora.r=32", "training.packing=false"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise SpecError([f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set lora.r=32"])
        out = _deep_merge(out, _expand_dotted({key: _parse_value(value)}))
    return out


def spec_overrides_from_args(args: Any) -> dict[str, Any]:
    """Overrides from the ``finetune`` command line: ``--set`` plus the shortcut flags (which win)."""
    out = parse_set_options(getattr(args, "set", None))
    shortcuts = {
        "base_model": getattr(args, "base_model", None),
        "training.max_steps": getattr(args, "max_steps", None),
        "training.epochs": getattr(args, "epochs", None),
        "time_budget": getattr(args, "time_budget", None),
    }
    return _deep_merge(out, _expand_dotted({k: v for k, v in shortcuts.items() if v is not None}))
