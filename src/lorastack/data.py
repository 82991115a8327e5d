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

No byte sequence makes the checks raise: undecodable bytes, a BOM in mid-file, JSON nested too deeply,
integer literals too long to convert, ``NaN``, lone UTF-16 surrogates and lines over
``MAX_LINE_BYTES`` are each a ``file:line`` diagnostic, and the work per line is linear in its size
(``lorastack.chat`` encodes a conversation in linear time).

This module imports only the standard library; ``transformers`` is imported when a tokenizer is loaded.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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
MAX_LINE_BYTES = 32 * 1024 * 1024  # a line this long is far beyond any model's context; it is not parsed
MAX_INT_DIGITS = 4300  # Python's int-from-string limit (sys.get_int_max_str_digits default)
SHOWN_VALUE_CHARS = 60  # values quoted in messages are cut to this length

# Problem codes and what each means: the reference for users (README) and for the severity policy.
CODES: dict[str, str] = {
    "unreadable_file": "the file does not exist or cannot be read",
    "invalid_utf8": "the line is not valid UTF-8 (save the file as UTF-8; a BOM is fine)",
    "blank_line": "an empty line (skipped)",
    "invalid_json": "the line is not one JSON value (or uses NaN/Infinity, huge numbers or deep nesting)",
    "line_too_long": f"the line is longer than {MAX_LINE_BYTES // 2**20} MB and is not parsed",
    "lone_surrogate": "a string holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is not text",
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
    "max_seq_len_over_context": "max_seq_len is beyond the base model's context length",
    "internal_error": "a check failed unexpectedly on this line (a lorastack bug: please report it)",
}
# Problems found without a tokenizer; ``validate_file(structure_warnings=False)`` omits these warnings
# when the structure pass already reported them (the trainer's second, token-level pass).
TOKEN_CODES = frozenset({"too_long", "final_answer_truncated", "template_error", "max_seq_len_over_context"})


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
    structure_warnings: bool = True  # False: leave out warnings that need no tokenizer (reported before)

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
        if severity == "warning" and not self.structure_warnings and code not in TOKEN_CODES:
            return
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


def _lines(path: Path) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, raw bytes without the line ending, size in bytes), streamed; the first line's UTF-8
    BOM is removed. A line over MAX_LINE_BYTES is skipped in bounded memory and yielded as None."""
    with open(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            size = len(raw)
            if size > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(1 << 20)
                    size += len(raw)
                yield lineno, None, size
                continue
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield lineno, raw.rstrip(b"\r\n"), size


class _BadNumber(ValueError):
    """A JSON number the checks refuse (NaN/Infinity, or an integer literal too long to convert)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        digits = len(text.lstrip("-"))
        raise _BadNumber(f"an integer literal has {digits:,} digits (at most {MAX_INT_DIGITS:,})")
    return int(text)


def _parse_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not valid JSON (JSON has no NaN or Infinity)")


def _loads(text: str) -> Any:
    """Strict JSON: NaN/Infinity and integer literals over MAX_INT_DIGITS digits raise _BadNumber."""
    return json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)


def read_examples(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Stream ``(line number, messages)`` from a chat JSONL file, skipping blank lines.

    For data that :func:`validate_file` accepted; raises ValueError naming the line otherwise.
    """
    path = Path(path)
    for lineno, raw, size in _lines(path):
        if raw is None:
            raise ValueError(f"{path}:{lineno}: the line is {size:,} bytes, over {MAX_LINE_BYTES:,}")
        if not raw.strip():
            continue
        try:
            obj = _loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{path}:{lineno}: not a UTF-8 JSON line ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise ValueError(f"{path}:{lineno}: expected an object with a 'messages' list")  # noqa: TRY004
        yield lineno, obj["messages"]


# -- checks --------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    """``repr(value)``, cut to SHOWN_VALUE_CHARS characters (a diagnostic never echoes a huge value)."""
    try:
        big = isinstance(value, (dict, list)) and len(value) >= 20
        text = f"<{type(value).__name__}>" if big else repr(value)
    except RecursionError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


_LONE_SURROGATE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _lone_surrogate(text: str, obj: Any) -> str | None:
    """A description of the first lone UTF-16 surrogate escape in the parsed line, or None."""
    if "\\u" not in text:
        return None  # JSON text that is valid UTF-8 can only carry surrogates as \u escapes
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        match = _LONE_SURROGATE.search(text)
        where = f" ({match.group(0)} at column {match.start() + 1})" if match else ""
        return f"a string holds a lone UTF-16 surrogate escape{where}, which is not text; fix or remove it"
    except (ValueError, RecursionError):  # nesting the parser accepted but the encoder does not
        return None
    return None


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
        where = f"message {i} ({_short(role)[1:-1]})" if isinstance(role, str) else where
        unknown = [k for k in msg if k not in ALLOWED_MESSAGE_KEYS]
        if unknown:
            shown = ", ".join(_short(k) for k in unknown[:5])
            shown += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            add(
                "message_unrecognized_key",
                f"{where} has unrecognized key(s) {shown}; allowed: " + ", ".join(ALLOWED_MESSAGE_KEYS),
            )
            ok = False
        has_call = role == "assistant" and bool(msg.get("tool_calls") or msg.get("function_call"))
        if "role" not in msg:
            add("message_missing_key", f"{where} has no 'role'")
            ok = False
        elif not isinstance(role, str) or role not in ALLOWED_ROLES:
            add("unrecognized_role", f"{where}: role {_short(role)} is not one of {', '.join(ALLOWED_ROLES)}")
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
            elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
                add("invalid_weight", f"{where}: weight must be 0 or 1, got {_short(weight)}")
                ok = False
        if "name" in msg and not isinstance(msg["name"], str):
            add("data_type", f"{where}: 'name' must be a string")
            ok = False
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            add("data_type", f"{where}: 'tool_calls' must be a list")
            ok = False
        if "tool_call_id" in msg and not isinstance(msg["tool_call_id"], str):
            add("data_type", f"{where}: 'tool_call_id' must be a string")
            ok = False
    return ok


def context_limit(tokenizer: Any) -> int | None:
    """The model context a tokenizer declares (``model_max_length``), or None when it declares none
    (transformers uses a huge placeholder then)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < 10_000_000 else None


OnEncoded = Callable[[int, Any], None]


def validate_file(
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    purpose: Purpose = "train",
    *,
    display_name: str | None = None,
    context_length: int | None = None,
    structure_warnings: bool = True,
    on_encoded: OnEncoded | None = None,
) -> Report:
    """Check one chat JSONL file in a single streaming pass and return its :class:`Report`.

    With a ``tokenizer`` (the base model's, with its chat template) every example is encoded with
    :func:`lorastack.chat.encode_chat`: token statistics are collected and examples over
    ``max_seq_len`` (default: the model's context, ``context_length`` or the tokenizer's
    ``model_max_length``) are reported; a ``max_seq_len`` beyond that context is an error. ``purpose``
    selects the severity of dataset-level rules: a training file needs at least 10 examples, an
    assistant message in every example and something to train on; for a validation file these are
    warnings.

    ``display_name``: the name problems are reported under (e.g. the user's file when ``path`` is the
    store's content-addressed copy). ``structure_warnings=False`` leaves out the warnings a pass without
    a tokenizer already reported. ``on_encoded(line, encoded)`` receives each trainable example's
    :class:`lorastack.chat.EncodedChat`, so a caller can train on exactly what was checked without
    encoding it again. Never raises on the file's contents: every problem is in the report.
    """
    if purpose not in ("train", "validation"):
        raise ValueError(f"purpose must be 'train' or 'validation', got {purpose!r}")
    path = Path(path)
    report = Report(file=display_name or str(path), purpose=purpose)
    report.structure_warnings = structure_warnings
    if tokenizer is not None:
        report.tokenizer = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        context = context_length or context_limit(tokenizer)
        if max_seq_len is None:
            max_seq_len = context
        elif context is not None and max_seq_len > context:
            source = "the model's context" if context_length else "the tokenizer's model_max_length"
            report.add(
                None,
                "max_seq_len_over_context",
                f"max_seq_len={max_seq_len} is beyond {report.tokenizer}'s context of {context} tokens "
                f"({source}); use max_seq_len {context} or less",
            )
    report.max_seq_len = max_seq_len
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        report.add(None, "unreadable_file", f"cannot read the file: {exc.strerror or exc}")
        return report
    except ValueError as exc:  # e.g. a NUL byte in the path
        report.add(None, "unreadable_file", f"cannot read the file: {exc}")
        return report
    report.bom = head.startswith(codecs.BOM_UTF8)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        report.add(1, "invalid_utf8", "the file is UTF-16; save it as UTF-8")
        return report
    if size > AZURE_MAX_FILE_BYTES:
        report.add(
            None, "file_too_large", f"{size / 2**20:.0f} MB exceeds Azure's 512 MB upload limit", "warning"
        )

    lineno = 0
    try:
        for lineno, raw, line_size in _lines(path):
            try:
                _check_line(report, lineno, raw, line_size, purpose, tokenizer, max_seq_len, on_encoded)
            except Exception as exc:  # noqa: BLE001 (a bug in a check must not lose the rest of the report)
                report.add(lineno, "internal_error", f"{type(exc).__name__}: {_short(str(exc))[1:-1]}")
    except OSError as exc:
        report.add(lineno + 1, "unreadable_file", f"reading stopped: {exc.strerror or exc}")

    if purpose == "train" and report.examples < MIN_TRAINING_EXAMPLES:
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
            + ("" if purpose == "train" else ": no validation loss can be computed from this file"),
            "error" if purpose == "train" else "warning",
        )
    return report


def _check_line(
    report: Report,
    lineno: int,
    raw: bytes | None,
    line_size: int,
    purpose: Purpose,
    tokenizer: Any,
    max_seq_len: int | None,
    on_encoded: OnEncoded | None,
) -> None:
    """All checks of one line, each problem added to ``report``."""
    train = purpose == "train"

    def add(code: str, message: str, severity: Severity = "error") -> None:
        report.add(lineno, code, message, severity)

    if raw is None:
        report.examples += 1
        add(
            "line_too_long",
            f"the line is {line_size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit (far beyond any "
            "model's context); split the conversation, or check for a missing line break",
        )
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.examples += 1
        add(
            "invalid_utf8",
            f"byte {exc.start + 1} (0x{raw[exc.start]:02x}) is not valid UTF-8; save the file as UTF-8",
        )
        return
    if not text.strip():
        add("blank_line", "empty line (skipped); remove it", "warning")
        return
    report.examples += 1
    if text.startswith("\ufeff"):
        add(
            "invalid_json",
            "the line starts with a byte-order mark (BOM), which only the file's first line may carry "
            "(were files concatenated?); remove it",
        )
        return
    try:
        obj = _loads(text)
    except json.JSONDecodeError as exc:
        add("invalid_json", f"{exc.msg} at column {exc.colno}; each line must be one complete JSON object")
        return
    except _BadNumber as exc:
        add("invalid_json", f"{exc}; each line must be one chat example in standard JSON")
        return
    except RecursionError:
        add("invalid_json", "the JSON is nested too deeply to parse; each line must be one chat example")
        return
    except ValueError as exc:  # any other number the parser refuses
        add("invalid_json", f"{_short(str(exc))[1:-1]}; each line must be one complete JSON object")
        return
    if not isinstance(obj, dict):
        add("data_type", f"the line is a JSON {type(obj).__name__}, not an object with a 'messages' list")
        return
    if "messages" not in obj:
        add("missing_messages_list", "no 'messages' key; each line must be {\"messages\": [...]}")
        return
    if surrogate := _lone_surrogate(text, obj):
        add("lone_surrogate", surrogate)
        return
    messages = obj["messages"]
    if not _check_structure(messages, add):
        if isinstance(messages, list):
            report.messages += len(messages)
        return
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
        return
    if "user" not in roles:
        add("missing_user_message", "no user message", "warning")
    trained = [m for m in assistants if m.get("weight", 1) != 0]
    if not trained:
        add("nothing_to_train", "every assistant message has weight 0: the example is skipped", "warning")
        return
    if roles[-1] != "assistant":
        add(
            "last_message_not_assistant",
            f"the example ends with a {roles[-1]} message, which is never trained on; end with the assistant's answer",
            "warning",
        )
    if tokenizer is None:
        report.trainable_examples += 1
        return
    from lorastack.chat import ChatTemplateError, encode_chat

    try:
        enc = encode_chat(tokenizer, messages, max_seq_len)
    except ChatTemplateError as exc:
        add("template_error", str(exc))
        return
    report.tokens.add(enc.full_length)
    if enc.final_answer_cut:
        add(
            "final_answer_truncated",
            f"{enc.full_length} tokens; even without earlier turns the final answer does not fit in "
            f"max_seq_len={max_seq_len}: shorten it or raise max_seq_len",
        )
        return
    if enc.truncated:
        add(
            "too_long",
            f"{enc.full_length} tokens > max_seq_len={max_seq_len}: the oldest {enc.dropped_messages} "
            "message(s) after the system prompt will be dropped",
            "warning",
        )
    report.assistant_tokens.add(enc.n_assistant_tokens)
    report.trainable_examples += 1
    if on_encoded is not None:
        on_encoded(lineno, enc)


def validate_files(
    files: Iterable[str | os.PathLike[str]],
    validation_files: Iterable[str | os.PathLike[str]] = (),
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    **options: Any,
) -> list[Report]:
    """Validate training files and validation files; one report per file, in order.

    ``options`` are :func:`validate_file`'s keyword arguments (e.g. ``context_length``)."""
    reports = [validate_file(f, tokenizer, max_seq_len, "train", **options) for f in files]
    reports += [validate_file(f, tokenizer, max_seq_len, "validation", **options) for f in validation_files]
    return reports


def check_files(
    files: Iterable[str | os.PathLike[str]],
    validation_files: Iterable[str | os.PathLike[str]] = (),
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    **options: Any,
) -> list[Report]:
    """Like :func:`validate_files` but raises :class:`DataValidationError` if any file has an error.

    The trainer calls this before loading any model, so a bad dataset fails before GPU time is paid for.
    """
    reports = validate_files(files, validation_files, tokenizer, max_seq_len, **options)
    if any(not r.ok for r in reports):
        raise DataValidationError(reports)
    return reports


# -- report text -----------------------------------------------------------------------------------------


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
