"""`lorastack demo` end to end on a fresh store: validate, fine-tune, publish, serve, and an OpenAI client chats."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trained_answer(question: str) -> str:
    for line in (REPO / "jobs/examples/plant-care-train.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        if any(m["role"] == "user" and m["content"] == question for m in msgs):
            return next(m["content"] for m in msgs if m["role"] == "assistant")
    raise AssertionError(f"{question!r} is not in the sample data")


@pytest.mark.slow
def test_demo_trains_an_adapter_and_serves_it_to_the_openai_client(tmp_path):
    from openai import AuthenticationError, OpenAI

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorastack", "demo", "--store", str(tmp_path / "store"), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,  # the demo finds its sample job in the checkout, wherever it is started
        )
    try:
        key, deadline = None, time.monotonic() + 600
        while key is None and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            key = (m := re.search(r"API key:\s+(\S+)", log_path.read_text())) and m.group(1)
            time.sleep(1)
        out = log_path.read_text()
        assert key, out[-3000:]
        assert "TINY MODEL GENERATED HERE" in out  # it says plainly that no real model was used
        assert "published adapter plant-care@v1" in out

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        while time.monotonic() < deadline:  # the model loads in the background after the server starts
            try:
                models = [m.id for m in client.models.list().data]
                break
            except Exception:  # noqa: BLE001 (any error while the model loads: connection, 503)
                time.sleep(1)
        assert "plant-care" in models

        question = "How often should I water a snake plant?"
        reply = client.chat.completions.create(
            model="plant-care", temperature=0, max_tokens=24, messages=[{"role": "user", "content": question}]
        )
        answer = reply.choices[0].message.content
        # The adapter learned the sample's answer; the base model it was trained on did not know it.
        assert _trained_answer(question).startswith(answer.strip()[:40]), answer
        base = client.chat.completions.create(
            model=models[0], temperature=0, max_tokens=24, messages=[{"role": "user", "content": question}]
        )
        assert base.choices[0].message.content[:40] != answer[:40]
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
