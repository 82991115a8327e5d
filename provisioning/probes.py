"""Probe sizing for the inference app (pure).

ACA probe limits (azure-native docstrings): initialDelaySeconds 1-60, periodSeconds 1-240, failureThreshold 1-10.
So the longest startup window is 60 + 240 x 10 s = 2460 s. The AI Toolkit's startup probe (60 s delay,
10 s x 10) gives about 160 s: too short for a 7B model read from a standard share at ~60 MiB/s per file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_INITIAL_DELAY = 60
MAX_PERIOD = 240
MAX_FAILURES = 10
MAX_STARTUP_WINDOW = MAX_INITIAL_DELAY + MAX_PERIOD * MAX_FAILURES
MARGIN = 1.25  # model loads vary with share throughput; keep a quarter on top


@dataclass(frozen=True)
class ProbeSpec:
    """One ACA probe (HTTP GET)."""

    type: str  # Liveness | Readiness | Startup
    path: str
    initial_delay_seconds: int
    period_seconds: int
    failure_threshold: int
    timeout_seconds: int
    success_threshold: int = 1

    @property
    def window_seconds(self) -> int:
        """How long the probe tolerates failure before acting."""
        return self.initial_delay_seconds + self.period_seconds * self.failure_threshold


def startup_window_limit_text() -> str:
    return f"1-{int(MAX_STARTUP_WINDOW / MARGIN)} seconds (ACA allows a {MAX_STARTUP_WINDOW} s startup window)"


def size_probes(model_load_seconds: int, liveness_path: str, readiness_path: str) -> list[ProbeSpec]:
    """Liveness, readiness and startup probes for an app whose model takes ``model_load_seconds`` to load.

    The startup probe holds liveness and readiness off until the server answers, and its window covers the
    model load with a margin; readiness (model loaded) then gates traffic; liveness restarts a hung server.
    Raises ValueError when the load cannot fit ACA's maximum startup window.
    """
    needed = math.ceil(model_load_seconds * MARGIN)
    if model_load_seconds < 1 or needed > MAX_STARTUP_WINDOW:
        raise ValueError(f"{model_load_seconds} is out of range; allowed: {startup_window_limit_text()}")
    delay = min(MAX_INITIAL_DELAY, max(1, needed // 10))
    period = min(MAX_PERIOD, max(10, math.ceil((needed - delay) / MAX_FAILURES)))
    startup = ProbeSpec("Startup", liveness_path, delay, period, MAX_FAILURES, timeout_seconds=5)
    readiness = ProbeSpec("Readiness", readiness_path, 1, 10, 3, timeout_seconds=5)
    liveness = ProbeSpec("Liveness", liveness_path, 1, 30, 3, timeout_seconds=10)
    return [liveness, readiness, startup]
