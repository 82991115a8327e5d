"""The engine benchmark runs end to end (small): every engine either measures or says how to install it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("builtin", "vllm", "transformers", "llamacpp")


@pytest.mark.benchmark
@pytest.mark.slow
def test_bench_engines_measures_each_engine_or_says_how_to_install_it():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_engines.py"), "--clients", "1,2", "--requests", "1",
           "--max-tokens", "8", "--rounds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    print(text)
    assert re.search(r"^base\s+2 builtin\s+[0-9.]+ ", text, re.MULTILINE), text  # the baseline always runs
    for engine in ENGINES[1:]:
        measured = re.search(rf"^base\s+2 {engine}\s+[0-9.]+\s+[0-9.]+x", text, re.MULTILINE)
        skipped = re.search(rf"^skipped {engine}: .+", text, re.MULTILINE)
        assert measured or skipped, f"{engine}: neither measured nor skipped\n{text}"
    # transformers serve cannot load a PEFT directory: the table says so from the server's own error.
    if re.search(r"^base\s+2 transformers\s", text, re.MULTILINE):
        assert re.search(r"^adapter\s+-\s+transformers\s+cannot serve a PEFT dir \(HTTP \d+", text, re.MULTILINE)
