"""The serving benchmark runs end to end (small) and prints its ratio line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.benchmark
@pytest.mark.slow
def test_bench_serve_small_prints_ratio():
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_serve.py"),
        "--clients", "1,4",
        "--requests", "1",
        "--max-tokens", "8",
        "--hidden", "64",
        "--layers", "2",
        "--rounds", "1",
    ]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert re.search(r"^ratio \(throughput at 4 clients, lorastack / reference\): \d+\.\d+x", out.stdout, re.MULTILINE)
    # both approaches generated the same tokens (same greedy answers)
    rows = re.findall(r"^\s+(\d+) (reference|lorastack).*?(\d+)$", out.stdout, re.MULTILINE)
    by_clients = {}
    for clients, _, tokens in rows:
        by_clients.setdefault(clients, set()).add(tokens)
    assert by_clients and all(len(v) == 1 for v in by_clients.values()), out.stdout
