"""Shared pieces of the pipeline tests (tests/test_gitops*.py): the repo root on sys.path for ``ci``, workflow
loading, and a throwaway copy of the parts of the repo the workflows' scripts read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
if str(REPO) not in sys.path:  # `ci` is a top-level folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))


def workflow(name: str) -> dict:
    """A workflow file as GitHub reads it (PyYAML turns the `on:` key into True; put it back)."""
    doc = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def repo_copy(tmp_path: Path, *extra: str) -> Path:
    """A copy of Pulumi.yaml, stacks/, jobs/ (and ``extra`` paths) under ``tmp_path``: scripts may write there."""
    root = tmp_path / "repo"
    root.mkdir()
    for rel in ("Pulumi.yaml", "stacks", "jobs", *extra):
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, root / rel)
        elif src.exists():
            shutil.copy2(src, root / rel)
    return root


def lorastack(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real ``lorastack`` CLI in a subprocess (what a workflow step runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "lorastack", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
