"""What a run reports on the store while it trains: ``runs/<id>/status.json`` and ``runs/<id>/results.csv``.

Both files are rewritten atomically (temporary sibling + rename) on every update, so a reader (the CLI, a
dashboard, ``az storage file download``) always sees a whole file. ``results.csv`` uses the column names
of Azure OpenAI fine-tuning so existing tooling can read it. Standard library only (no torch here).
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from lorastack.store import Store, write_bytes_atomic

PHASES = ("validating", "loading", "training", "publishing", "succeeded", "failed", "preempted", "stopped")

# Azure OpenAI fine-tuning results.csv columns (azure-ai-docs fine-tuning-studio.md).
RESULTS_COLUMNS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "validation_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


def utc_now() -> str:
    """Current UTC time as ISO 8601 with a Z suffix."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunReporter:
    """Keeps ``status.json`` and ``results.csv`` of one run current on the store.

    ``update`` merges fields into the status (keeping earlier ones, e.g. ``started_at``); ``record``
    merges metrics into the results row of a step. A resumed run drops the rows after the step it
    resumes from (those steps are trained again) with ``truncate_after``.
    """

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.run_dir = store.run_dir(run_id)
        self.status: dict[str, Any] = {}
        self.rows: dict[int, dict[str, Any]] = {}
        existing = store.read_status(run_id)
        if existing:
            self.status.update(existing)
        self._load_results()

    # -- status.json ----------------------------------------------------------------------------
    def update(self, phase: str | None = None, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` (and ``phase``) into status.json and write it atomically."""
        if phase is not None:
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}")
            if phase != self.status.get("phase"):
                self.status.setdefault("phase_history", []).append({"phase": phase, "at": utc_now()})
            self.status["phase"] = phase
        self.status.update(fields)
        self.status["run_id"] = self.run_id
        self.status["updated_at"] = utc_now()
        self.store.write_status(self.run_id, self.status)
        return self.status

    def start_attempt(self) -> None:
        """Record a new process working on this run (a first start, or a resume after preemption)."""
        self.status["attempts"] = int(self.status.get("attempts", 0)) + 1
        self.status.setdefault("started_at", utc_now())
        self.status["attempt_started_at"] = utc_now()
        for stale in ("error", "finished_at", "message"):
            self.status.pop(stale, None)

    # -- results.csv ----------------------------------------------------------------------------
    @property
    def results_path(self):
        return self.run_dir / "results.csv"

    def _load_results(self) -> None:
        if not self.results_path.is_file():
            return
        with open(self.results_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                try:
                    step = int(row["step"])
                except (KeyError, ValueError):
                    continue
                self.rows[step] = {
                    k: v for k, v in row.items() if k in RESULTS_COLUMNS and v not in ("", None)
                }

    def truncate_after(self, step: int) -> None:
        """Forget rows after ``step`` (a resumed run trains those steps again) and rewrite the file."""
        self.rows = {s: r for s, r in self.rows.items() if s <= step}
        self._write_results()

    def record(self, step: int, **metrics: Any) -> None:
        """Merge metrics (RESULTS_COLUMNS names) into the row of ``step`` and rewrite results.csv."""
        row = self.rows.setdefault(int(step), {})
        for key, value in metrics.items():
            if key not in RESULTS_COLUMNS:
                raise KeyError(f"{key!r} is not a results.csv column")
            if value is not None:
                row[key] = f"{value:.6f}" if isinstance(value, float) else value
        row["step"] = int(step)
        self._write_results()

    def _write_results(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULTS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for step in sorted(self.rows):
            writer.writerow({k: self.rows[step].get(k, "") for k in RESULTS_COLUMNS})
        write_bytes_atomic(self.results_path, buf.getvalue().encode("utf-8"))
