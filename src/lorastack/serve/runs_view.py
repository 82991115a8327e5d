"""What the UI's Runs view shows, read from the store: runs, their loss curves (``runs/<id>/results.csv``),
the adapter version each run published, and that version's ``eval.json`` as tables.

Pure reads with plain values out; anything malformed becomes a message, never an exception (the UI
shows it in place of the table).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from lorastack.store import EVAL_FILE, NAME_RE, Store, StoreError, parse_adapter_ref, read_json

RESULTS_FILE = "results.csv"
LOSS_SERIES = {"train_loss": "training", "valid_loss": "validation"}
MAX_RESULTS_BYTES = 16 << 20


def list_runs(store: Store) -> list[str]:
    """Run ids with a results.csv, newest first."""
    try:
        runs = [d for d in store.runs_dir.iterdir() if NAME_RE.fullmatch(d.name) and (d / RESULTS_FILE).is_file()]
        return [d.name for d in sorted(runs, key=lambda d: (d / RESULTS_FILE).stat().st_mtime, reverse=True)]
    except OSError:
        return []


def loss_points(store: Store, run_id: str) -> tuple[list[dict[str, Any]], str]:
    """(points, message): ``{"step", "loss", "series"}`` per logged training / validation loss."""
    try:
        path = store.run_dir(run_id) / RESULTS_FILE
        raw = path.read_bytes()[:MAX_RESULTS_BYTES]
        text = raw.decode("utf-8", "replace")
    except (StoreError, OSError) as exc:
        return [], f"No results for run {run_id!r}: {exc}"
    points: list[dict[str, Any]] = []
    try:
        for row in csv.DictReader(io.StringIO(text)):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            for column, series in LOSS_SERIES.items():
                try:
                    value = float(row.get(column) or "")
                except ValueError:
                    continue
                if math.isfinite(value):
                    points.append({"step": step, "loss": value, "series": series})
    except csv.Error as exc:
        return points, f"results.csv of run {run_id} is malformed: {exc}"
    if not points:
        return [], f"Run {run_id} has logged no loss yet."
    n_train = sum(p["series"] == "training" for p in points)
    return points, f"Run {run_id}: {n_train} training and {len(points) - n_train} validation loss points."


def run_adapter(store: Store, run_id: str) -> str | None:
    """The ``name@vN`` a run published (its manifest's ``run_id``), newest if several."""
    found = None
    for entry in store.adapter_catalog():
        for adapter in entry.versions.values():
            if adapter.manifest.get("run_id") == run_id:
                found = adapter.ref
    return found


def evaluated_versions(store: Store) -> list[str]:
    """Every ``name@vN`` that has an eval.json, newest versions first within each adapter."""
    refs = []
    for entry in store.adapter_catalog():
        for version in reversed(list(entry.versions)):
            if (store.adapters_dir / entry.name / version / EVAL_FILE).is_file():
                refs.append(f"{entry.name}@{version}")
    return refs


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return str(value)[:200]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt or "")


def eval_tables(store: Store, ref: str) -> tuple[list[str], list[list[str]], list[str], list[list[str]], str]:
    """(metric headers, metric rows, sample headers, sample rows, message) for ``name@vN``'s eval.json.

    Metrics: one row per metric, one column per model compared (the baseline, then the adapter).
    """
    try:
        name, version = parse_adapter_ref(ref)
        if version is None:
            raise StoreError(f"{ref!r} names no version")
        path = store.adapters_dir / name / version / EVAL_FILE
        data = read_json(path)
    except FileNotFoundError:
        return [], [], [], [], f"{ref} has no evaluation yet (run `lorastack eval {ref}`)."
    except (StoreError, OSError) as exc:
        return [], [], [], [], f"The evaluation of {ref} cannot be read: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        return [], [], [], [], f"The evaluation of {ref} has no metrics."
    metrics = {k: v for k, v in data["metrics"].items() if isinstance(v, dict)}
    against, adapter = str(data.get("against") or ""), str(data.get("adapter") or ref)
    order = [m for m in (against, adapter) if m in metrics] + [m for m in metrics if m not in (against, adapter)]
    keys: list[str] = []
    for model in order:
        keys += [k for k in metrics[model] if k not in keys]
    metric_rows = [[k, *(_fmt(metrics[m].get(k)) for m in order)] for k in keys]
    sample_rows = []
    for sample in data.get("samples") or []:
        if isinstance(sample, dict):
            sample_rows.append(
                [_prompt_text(sample.get("prompt")), _fmt(sample.get("reference")), *(_fmt(sample.get(m)) for m in order)]
            )
    message = f"{adapter} against {against or 'its baseline'}"
    created = data.get("created_at")
    if created:
        message += f", evaluated {created}"
    return ["metric", *order], metric_rows, ["prompt", "reference", *order], sample_rows[:50], message
