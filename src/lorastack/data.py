"""Chat fine-tuning data checks: ``lorastack validate`` and the trainer's fail-fast gate.

Checks the Azure OpenAI / OpenAI chat fine-tuning format (JSON Lines, one ``{"messages": [...]}`` per
line, UTF-8 with or without BOM, known roles and keys, non-empty string content, ``weight`` 0/1 on
assistant messages, at least 10 training examples) plus what lorastack's assistant-only loss needs
(the last message is the assistant's, something is left to train on, and, with the base model's
tokenizer and chat template, the length limit and that truncation never cuts the final answer).

Every problem is reported in one pass as ``file:line: error|warning: code: message``; codes follow the
OpenAI cookbook's (``invalid_json``, ``missing_content``, ...). Files are streamed line by line and only
counters are kept (token-length histograms for exact percentiles; at most
``MAX_STORED_PER_CODE`` problems per code are kept verbatim), so memory does not grow with file size.

This module imports only the standard library; ``transformers`` is imported when a tokenizer is loaded.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning"]
Purpose = Literal["train", "validation"]

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "function")
ALLOWED_MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call")
MIN_TRAINING_EXAMPLES = 10  # Azure OpenAI refuses smaller training files
AZURE_MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_STORED_PER_CODE = 50

# Problem codes and what each means: the reference for users (README) and for the severity policy.
CODES: dict[str, str] = {
    "unreadable_file": "the file does not exist or cannot be read",
    "invalid_utf8": "the line is not valid UTF-8 (save the file as UTF-8; a BOM is fine)",
    "blank_line": "an empty line (skipped)",
    "invalid_json": "the line is not one JSON value",
    "data_type": "the line (or a message) is not a JSON object, or a field has the wrong type",
    "missing_messages_list": "no non-empty 'messages' list",
    "message_missing_key": "a message lacks 'role' or 'content'",
    "message_unrecognized_key": "a message has a key other than " + ", ".join(ALLOWED_MESSAGE_KEYS),
    "unrecognized_role": "a role other than " + ", ".join(ALLOWED_ROLES),
    "missing_content": "content is empty or not a string",
    "invalid_weight": "'weight' is not 0 or 1, or is set on a non-assistant message",
    "example_missing_assistant_message": "no assistant message (nothing to learn from)",
    "missing_user_message": "no user message",
    "last_message_not_assistant": "trailing messages after the last assistant answer are never trained on",
    "nothing_to_train": "every assistant message has weight 0",
    "too_long": "longer than the token limit: the oldest turns will be dropped to fit",
    "final_answer_truncated": "even alone with the system prompt, the final answer does not fit the token limit",
    "template_error": "the base model's chat template cannot render the example",
    "too_few_examples": f"fewer than {MIN_TRAINING_EXAMPLES} examples (Azure refuses smaller training files)",
    "no_trainable_examples": "no example has anything to train on",
    "file_too_large": "larger than Azure's 512 MB upload limit",
}


@dataclass(frozen=True)
class Problem:
    """One finding, printed as ``file:line: severity: code: message`` (no line for file-level ones)."""

    file: str
    line: int | None
    code: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.severity}: {self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
        }


class Histogram:
    """Exact min/mean/percentiles of non-negative integers in memory bounded by the number of distinct values."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.total = 0

    def add(self, value: int) -> None:
        self.counts[value] += 1
        self.n += 1
        self.total += value

    def percentile(self, q: float) -> int | None:
        """Nearest-rank percentile (q in [0, 100])."""
        if not self.n:
            return None
        rank = max(1, math.ceil(q / 100 * self.n))
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= rank:
                return value
        return max(self.counts)

    def summary(self) -> dict[str, Any] | None:
        if not self.n:
            return None
        return {
            "min": min(self.counts),
            "mean": round(self.total / self.n, 1),
            "p95": self.percentile(95),
            "max": max(self.counts),
            "total": self.total,
        }


def suggested_epochs(n_examples: int) -> int | None:
    """The OpenAI cookbook's default: 3 epochs, raised toward 100 examples seen (max 25 epochs) for small
    sets, lowered toward 25,000 for large ones (min 1)."""
    if n_examples <= 0:
        return None
    target, min_examples, max_examples = 3, 100, 25_000
    if n_examples * target < min_examples:
        return min(25, min_examples // n_examples)
    if n_examples * target > max_examples:
        return max(1, max_examples // n_examples)
    return target


@dataclass
class Report:
    """The result of validating one file: problems (bounded), counts and token statistics."""

    file: str
    purpose: Purpose = "train"
    max_seq_len: int | None = None
    tokenizer: str | None = None
    examples: int = 0
    messages: int = 0
    trainable_examples: int = 0
    bom: bool = False
    problems: list[Problem] = field(default_factory=list)
    error_counts: Counter[str] = field(default_factory=Counter)
    warning_counts: Counter[str] = field(default_factory=Counter)
    messages_per_example: Histogram = field(default_factory=Histogram)
    tokens: Histogram = field(default_factory=Histogram)
    assistant_tokens: Histogram = field(default_factory=Histogram)

    @property
    def errors(self) -> list[Problem]:
        """The stored errors (at most MAX_STORED_PER_CODE per code; ``error_count`` has the full count)."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The stored warnings (at most MAX_STORED_PER_CODE per code)."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def error_count(self) -> int:
        return sum(self.error_counts.values())

    @property
    def warning_count(self) -> int:
        return sum(self.warning_counts.values())

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return self.error_count == 0

    @property
    def suggested_epochs(self) -> int | None:
        return suggested_epochs(self.trainable_examples) if self.purpose == "train" else None

    def add(self, line: int | None, code: str, message: str, severity: Severity = "error") -> None:
        counts = self.error_counts if severity == "error" else self.warning_counts
        counts[code] += 1
        if counts[code] <= MAX_STORED_PER_CODE:
            self.problems.append(Problem(self.file, line, code, message, severity))

    def unshown(self) -> dict[str, int]:
        """Problems counted but not stored, per code."""
        out = {}
        for counts in (self.error_counts, self.warning_counts):
            for code, n in counts.items():
                if n > MAX_STORED_PER_CODE:
                    out[code] = out.get(code, 0) + n - MAX_STORED_PER_CODE
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "purpose": self.purpose,
            "ok": self.ok,
            "error_count": self.error_count,
            "warning_count": self.warning_count,
            "error_counts": dict(self.error_counts),
            "warning_counts": dict(self.warning_counts),
            "problems": [p.to_dict() for p in self.problems],
            "problems_not_shown": self.unshown(),
            "examples": self.examples,
            "messages": self.messages,
            "trainable_examples": self.trainable_examples,
            "bom": self.bom,
            "messages_per_example": self.messages_per_example.summary(),
            "tokenizer": self.tokenizer,
            "max_seq_len": self.max_seq_len,
            "tokens": self.tokens.summary(),
            "assistant_tokens": self.assistant_tokens.summary(),
            "suggested_epochs": self.suggested_epochs,
        }


class DataValidationError(ValueError):
    """Raised by :func:`check_files` when a dataset has errors; ``reports`` holds the details."""

    def __init__(self, reports: list[Report]):
        self.reports = reports
        lines = [str(p) for r in reports for p in r.problems if p.severity == "error"]
        more = sum(r.error_count for r in reports) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more errors")
        super().__init__("\n".join(lines))


# -- reading -------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes without the line ending), streamed; the UTF-8 BOM is removed."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield lineno, raw.rstrip(b"\r\n")


def read_examples(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Stream ``(line number, messages)`` from a chat JSONL file, skipping blank lines.

    For data that :func:`validate_file` accepted; raises ValueError naming the line otherwise.
    """
    path = Path(path)
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a UTF-8 JSON line ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise ValueError(f"{path}:{lineno}: expected an object with a 'messages' list")  # noqa: TRY004
        yield lineno, obj["messages"]


# -- checks --------------------------------------------------------------------------------------


def _check_structure(messages: Any, add) -> bool:
    """Format checks of one example; returns True if it is well-formed enough to tokenize."""
    ok = True
    if not isinstance(messages, list) or not messages:
        add("missing_messages_list", "'messages' must be a non-empty list of message objects")
        return False
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, dict):
            add("data_type", f"{where} is a {type(msg).__name__}, not an object")
            ok = False
            continue
        role = msg.get("role")
        where = f"message {i} ({role})" if isinstance(role, str) else where
        unknown = [k for k in msg if k not in ALLOWED_MESSAGE_KEYS]
        if unknown:
            add(
                "message_unrecognized_key",
                f"{where} has unrecognized key(s) {', '.join(map(repr, unknown))}; allowed: "
                + ", ".join(ALLOWED_MESSAGE_KEYS),
            )
            ok = False
        has_call = role == "assistant" and bool(msg.get("tool_calls") or msg.get("function_call"))
        if "role" not in msg:
            add("message_missing_key", f"{where} has no 'role'")
            ok = False
        elif role not in ALLOWED_ROLES:
            add("unrecognized_role", f"{where}: role {role!r} is not one of {', '.join(ALLOWED_ROLES)}")
            ok = False
        if "content" not in msg and not has_call:
            add("message_missing_key", f"{where} has no 'content'")
            ok = False
        elif "content" in msg and not (has_call and msg["content"] in (None, "")):
            content = msg["content"]
            if not isinstance(content, str):
                kind = "a list of content parts" if isinstance(content, list) else type(content).__name__
                add("missing_content", f"{where}: content must be a non-empty string, got {kind}")
                ok = False
            elif not content.strip():
                add("missing_content", f"{where}: content is empty")
                ok = False
        if "weight" in msg:
            weight = msg["weight"]
            if role != "assistant":
                add("invalid_weight", f"{where}: 'weight' is only allowed on assistant messages")
                ok = False
            elif isinstance(weight, bool) or weight not in (0, 1):
                add("invalid_weight", f"{where}: weight must be 0 or 1, got {weight!r}")
                ok = False
        if "name" in msg and not isinstance(msg["name"], str):
            add("data_type", f"{where}: 'name' must be a string")
            ok = False
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            add("data_type", f"{where}: 'tool_calls' must be a list")
            ok = False
    return ok


def validate_file(
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    purpose: Purpose = "train",
) -> Report:
    """Check one chat JSONL file in a single streaming pass and return its :class:`Report`.

    With a ``tokenizer`` (the base model's, with its chat template) every example is encoded with
    :func:`lorastack.chat.encode_chat`: token statistics are collected and examples over
    ``max_seq_len`` (default: the tokenizer's ``model_max_length``) are reported. ``purpose`` selects
    the severity of dataset-level rules: a training file needs at least 10 examples, an assistant
    message in every example and something to train on; for a validation file these are warnings.
    """
    if purpose not in ("train", "validation"):
        raise ValueError(f"purpose must be 'train' or 'validation', got {purpose!r}")
    path = Path(path)
    report = Report(file=str(path), purpose=purpose)
    train = purpose == "train"
    if tokenizer is not None:
        report.tokenizer = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if max_seq_len is None:
            limit = getattr(tokenizer, "model_max_length", None)
            max_seq_len = limit if isinstance(limit, int) and 0 < limit < 10_000_000 else None
    report.max_seq_len = max_seq_len
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        report.add(None, "unreadable_file", f"cannot read the file: {exc.strerror or exc}")
        return report
    report.bom = head.startswith(codecs.BOM_UTF8)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        report.add(1, "invalid_utf8", "the file is UTF-16; save it as UTF-8")
        return report
    if size > AZURE_MAX_FILE_BYTES:
        report.add(
            None, "file_too_large", f"{size / 2**20:.0f} MB exceeds Azure's 512 MB upload limit", "warning"
        )

    if tokenizer is not None:
        from lorastack.chat import ChatTemplateError, encode_chat

    for lineno, raw in _lines(path):

        def add(code: str, message: str, severity: Severity = "error", _line: int = lineno) -> None:
            report.add(_line, code, message, severity)

        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.examples += 1
            add(
                "invalid_utf8",
                f"byte {exc.start + 1} (0x{raw[exc.start]:02x}) is not valid UTF-8; save the file as UTF-8",
            )
            continue
        if not text.strip():
            add("blank_line", "empty line (skipped); remove it", "warning")
            continue
        report.examples += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            add(
                "invalid_json", f"{exc.msg} at column {exc.colno}; each line must be one complete JSON object"
            )
            continue
        if not isinstance(obj, dict):
            add("data_type", f"the line is a JSON {type(obj).__name__}, not an object with a 'messages' list")
            continue
        if "messages" not in obj:
            add("missing_messages_list", "no 'messages' key; each line must be {\"messages\": [...]}")
            continue
        messages = obj["messages"]
        if not _check_structure(messages, add):
            if isinstance(messages, list):
                report.messages += len(messages)
            continue
        report.messages += len(messages)
        report.messages_per_example.add(len(messages))

        roles = [m.get("role") for m in messages]
        assistants = [m for m in messages if m.get("role") == "assistant"]
        severity: Severity = "error" if train else "warning"
        if not assistants:
            add(
                "example_missing_assistant_message",
                "no assistant message: the example has nothing to learn from",
                severity,
            )
            continue
        if "user" not in roles:
            add("missing_user_message", "no user message", "warning")
        trained = [m for m in assistants if m.get("weight", 1) != 0]
        if not trained:
            add("nothing_to_train", "every assistant message has weight 0: the example is skipped", "warning")
            continue
        if roles[-1] != "assistant":
            add(
                "last_message_not_assistant",
                f"the example ends with a {roles[-1]} message, which is never trained on; end with the assistant's answer",
                "warning",
            )
        if tokenizer is None:
            report.trainable_examples += 1
            continue
        try:
            enc = encode_chat(tokenizer, messages, max_seq_len)
        except ChatTemplateError as exc:
            add("template_error", str(exc))
            continue
        report.tokens.add(enc.full_length)
        if enc.final_answer_cut:
            add(
                "final_answer_truncated",
                f"{enc.full_length} tokens; even without earlier turns the final answer does not fit in "
                f"max_seq_len={max_seq_len}: shorten it or raise max_seq_len",
            )
            continue
        if enc.truncated:
            add(
                "too_long",
                f"{enc.full_length} tokens > max_seq_len={max_seq_len}: the oldest {enc.dropped_messages} "
                "message(s) after the system prompt will be dropped",
                "warning",
            )
        report.assistant_tokens.add(enc.n_assistant_tokens)
        report.trainable_examples += 1

    if train and report.examples < MIN_TRAINING_EXAMPLES:
        report.add(
            None,
            "too_few_examples",
            f"{report.examples} example(s); at least {MIN_TRAINING_EXAMPLES} are required "
            "(start with 50; hundreds to thousands are best)",
        )
    if report.examples and report.trainable_examples == 0 and not report.error_counts:
        report.add(
            None,
            "no_trainable_examples",
            "no example has an assistant answer to train on"
            + ("" if train else ": no validation loss can be computed from this file"),
            "error" if train else "warning",
        )
    return report


def validate_files(
    files: Iterable[str | os.PathLike[str]],
    validation_files: Iterable[str | os.PathLike[str]] = (),
    tokenizer: Any = None,
    max_seq_len: int | None = None,
) -> list[Report]:
    """Validate training files and validation files; one report per file, in order."""
    reports = [validate_file(f, tokenizer, max_seq_len, "train") for f in files]
    reports += [validate_file(f, tokenizer, max_seq_len, "validation") for f in validation_files]
    return reports


def check_files(
    files: Iterable[str | os.PathLike[str]],
    validation_files: Iterable[str | os.PathLike[str]] = (),
    tokenizer: Any = None,
    max_seq_len: int | None = None,
) -> list[Report]:
    """Like :func:`validate_files` but raises :class:`DataValidationError` if any file has an error.

    The trainer calls this before loading any model, so a bad dataset fails before GPU time is paid for.
    """
    reports = validate_files(files, validation_files, tokenizer, max_seq_len)
    if any(not r.ok for r in reports):
        raise DataValidationError(reports)
    return reports


# -- CLI -----------------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    """Human-readable problems (in line order) and summary for one file."""
    out = [str(p) for p in sorted(report.problems, key=lambda p: (p.line is None, p.line or 0))]
    for code, n in report.unshown().items():
        out.append(f"{report.file}: note: {n} more {code} problem(s) not shown")
    status = "OK" if report.ok else "FAILED"
    out.append(
        f"{report.file} ({report.purpose}): {status}: {report.error_count} error(s), {report.warning_count} warning(s)"
    )
    summary = (
        f"  {report.examples} examples, {report.messages} messages, {report.trainable_examples} trainable"
    )
    mpe = report.messages_per_example.summary()
    if mpe:
        summary += f"; messages per example: min {mpe['min']}, mean {mpe['mean']}, max {mpe['max']}"
    out.append(summary)
    tok = report.tokens.summary()
    if tok:
        limit = f" (limit {report.max_seq_len})" if report.max_seq_len else ""
        out.append(
            f"  tokens per example{limit}: min {tok['min']}, mean {tok['mean']}, p95 {tok['p95']}, "
            f"max {tok['max']}"
        )
        ast = report.assistant_tokens.summary()
        if ast:
            out.append(
                f"  trained (assistant) tokens per example: min {ast['min']}, mean {ast['mean']}, "
                f"p95 {ast['p95']}, max {ast['max']}; total {ast['total']}"
            )
    if report.suggested_epochs:
        out.append(f"  suggested epochs: {report.suggested_epochs}")
    return "\n".join(out)


def validate_command(args: Any) -> int:
    """``lorastack validate``: 0 if every file passes, 1 if any has an error, 2 if the tokenizer cannot load."""
    tokenizer = None
    if getattr(args, "base_model", None):
        from lorastack.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.base_model)
        except Exception as exc:  # noqa: BLE001 (hub, offline, template and file errors all end here)
            print(
                f"lorastack validate: cannot load the tokenizer of {args.base_model!r}: {exc}",
                file=sys.stderr,
            )
            return 2
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        print(f"lorastack validate: --max-seq-len must be positive, got {args.max_seq_len}", file=sys.stderr)
        return 2
    reports = validate_files(args.files, getattr(args, "validation", None) or (), tokenizer, args.max_seq_len)
    ok = all(r.ok for r in reports)
    if getattr(args, "json", False):
        print(json.dumps({"ok": ok, "files": [r.to_dict() for r in reports]}, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        if len(reports) > 1:
            bad = sum(not r.ok for r in reports)
            print(f"\n{len(reports)} file(s): " + ("all OK" if ok else f"{bad} with errors"))
    return 0 if ok else 1
