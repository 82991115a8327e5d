"""The training benchmark runs end to end at a small size and prints its side-by-side ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.benchmark
def test_bench_train_prints_the_ratio_line():
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_train.py"),
        "--repeat",
        "1",
        "--max-examples",
        "12",
        "--max-seq-len",
        "512",
        "--hidden",
        "64",
        "--layers",
        "2",
        "--rounds",
        "1",
    ]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"^reference\s+12\s", out, re.MULTILINE) and re.search(
        r"^ours\s+\d+\s", out, re.MULTILINE
    ), out
    m = re.search(r"ratio ours/reference: trained tokens/s ([0-9.]+)x", out)
    assert m, out
    # Padding every example to 512 tokens wastes most of the reference's compute; packing does not.
    assert float(m.group(1)) > 1.0, out


@pytest.mark.benchmark
def test_bench_train_defaults_measures_auto_against_the_old_defaults_through_the_trainer():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_defaults.py"), "--quick"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for line in ("old defaults: float32, checkpointing on, rows of 1024", "checkpointing off", "auto: "):
        assert re.search(rf"^  {re.escape(line)}.* tok/s +[0-9.]+x$", out, re.MULTILINE), out
    assert re.search(r"^auto vs old defaults: [0-9.]+x; auto vs auto with (bfloat16|float32): [0-9.]+x$", out,
                     re.MULTILINE), out
    assert "choose_fast_path says: " in out
