"""The CLI starts fast: --help and argument parsing import no heavy library."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "pulumi", "gradio", "fastapi", "azure", "peft", "trl")


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from lorastack.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_has_help():
    for cmd in ("validate", "finetune", "train", "serve", "demo", "plan"):
        res = subprocess.run(
            [sys.executable, "-m", "lorastack", cmd, "--help"], check=False, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        assert "usage: lorastack " + cmd in res.stdout


def test_no_command_prints_help_and_fails():
    res = subprocess.run([sys.executable, "-m", "lorastack"], check=False, capture_output=True, text=True)
    assert res.returncode == 2 and "COMMAND" in res.stdout
