"""``lorastack validate``: check chat fine-tuning files, printing every problem as ``file:line``."""

from __future__ import annotations

import argparse
import json
import sys

from lorastack.data import Report, format_report, validate_files


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except (OSError, ValueError):
        return False


def _safe_output() -> None:
    # Problems quote file names and values; a terminal that cannot show a character gets an escape,
    # never a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _print_reports(reports: list[Report], as_json: bool) -> bool:
    ok = all(r.ok for r in reports)
    if as_json:
        print(json.dumps({"ok": ok, "files": [r.to_dict() for r in reports]}, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        if len(reports) > 1:
            bad = sum(not r.ok for r in reports)
            print(f"\n{len(reports)} file(s): " + ("all OK" if ok else f"{bad} with errors"))
    return ok


def validate_command(args: argparse.Namespace) -> int:
    """``lorastack validate``: 0 if every file passes, 1 if any has an error, 2 for a usage error (a bad
    ``--max-seq-len``, or a base model whose tokenizer cannot be loaded).

    Local inputs are checked first: a missing file is reported before any model is looked up.
    """
    _safe_output()
    files = list(args.files)
    validation = list(getattr(args, "validation", None) or ())
    as_json = getattr(args, "json", False)
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        print(f"lorastack validate: --max-seq-len must be positive, got {args.max_seq_len}", file=sys.stderr)
        return 2
    base_model = getattr(args, "base_model", None)
    missing = [f for f in [*files, *validation] if not _readable(f)]
    if missing and base_model:
        # Report the files as they are (the missing ones as unreadable_file) without looking the model up.
        print(
            f"lorastack validate: {len(missing)} file(s) cannot be read; the tokenizer of {base_model!r} "
            "was not loaded",
            file=sys.stderr,
        )
        base_model = None
    tokenizer = None
    context = None
    if base_model:
        from lorastack import models

        cache_dir = models.store_cache_dir(getattr(args, "store", None))
        try:
            tokenizer = models.load_tokenizer(base_model, getattr(args, "base_revision", None), cache_dir)
            config_context = models.load_context_length(base_model, getattr(args, "base_revision", None), cache_dir)
        except models.ModelLoadError as exc:
            print(f"lorastack validate: cannot load the tokenizer of {base_model!r}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 (template and file errors of a broken model directory)
            print(
                f"lorastack validate: cannot load the tokenizer of {base_model!r}: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            return 2
        context = models.context_length(None, tokenizer)
        if config_context is not None:
            context = min(context, config_context) if context else config_context
    reports = validate_files(files, validation, tokenizer, args.max_seq_len, context_length=context)
    ok = _print_reports(reports, as_json)
    return 0 if ok else 1

