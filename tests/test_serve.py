"""The inference server: OpenAI wire format with the official client against a live uvicorn server,
errors, adapters from the store (hot reload, corrupt and mismatched adapters), batching, auth."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

KEY = "test-key-0123456789"  # 16+ characters: `lorastack serve` refuses weaker keys
MSG = [{"role": "user", "content": "What is the weather like by the river today?"}]


# -- helpers ---------------------------------------------------------------------------------------


def make_adapter(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A real peft LoRA adapter on ``base`` with random (non-zero) weights, saved with the tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False, r=r))
    with torch.no_grad():  # random LoRA weights at a scale that changes answers without wrecking them
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.mul_(0.1)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def publish(store, name: str, base: Path, tmp: Path, seed: int, base_model: str | None = None):
    src = make_adapter(base, tmp / f"{name}-{seed}", seed)
    return store.publish_adapter(name, src, {"base_model": base_model or str(base), "base_revision": None})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Run ``app`` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL once ready."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become ready")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(c, model: str, messages=MSG, **kw) -> tuple[str, str, str]:
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    r = c.chat.completions.create(model=model, messages=messages, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.model


def sse_events(url: str, body: dict, key: str = KEY) -> list:
    """Raw SSE events of a streaming request: JSON objects, and the literal '[DONE]'."""
    import httpx

    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return events


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tiny_llama, tmp_path_factory):
    """A store with adapters alpha and beta on tiny_llama, and a live server with UI, keyed with KEY."""
    from lorastack.serve.server import create_app
    from lorastack.store import Store

    tmp = tmp_path_factory.mktemp("serve")
    store = Store(tmp / "store").init()
    publish(store, "alpha", tiny_llama, tmp, seed=1)
    publish(store, "beta", tiny_llama, tmp, seed=2)
    app = create_app(store, str(tiny_llama), [KEY, "second-key"], max_batch_size=8, max_queue=64)
    with live_server(app) as url:
        yield argparse.Namespace(store=store, base=str(tiny_llama), tmp=tmp, url=url, app=app)


# -- fast unit tests -------------------------------------------------------------------------------


def test_key_checks_and_loopback():
    from lorastack.serve.auth import bearer_token, is_loopback, key_matches, keys_from_env

    assert keys_from_env({"LORASTACK_API_KEYS": " a, b ,,"}) == ["a", "b"]
    assert key_matches("b", ["a", "b"]) and not key_matches("c", ["a", "b"]) and not key_matches("a", [])
    assert bearer_token("Bearer xyz") == "xyz" and bearer_token("Basic xyz") is None and bearer_token(None) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.4")


def test_stop_holdback():
    from lorastack.serve.engine import _holdback

    assert _holdback("hello wor", ["world"]) == 3
    assert _holdback("hello", ["xyz"]) == 0
    assert _holdback("abc\ufffd", []) == 1


def test_serve_refuses_no_auth_off_loopback(tmp_path, capsys):
    from lorastack.cli import main

    rc = main(["serve", "--local", "--store", str(tmp_path), "--no-auth", "--host", "0.0.0.0"])
    assert rc == 2
    assert "loopback" in capsys.readouterr().err


def test_serve_needs_keys_outside_local(tmp_path, capsys, monkeypatch):
    from lorastack.cli import main

    monkeypatch.delenv("LORASTACK_API_KEYS", raising=False)
    rc = main(["serve", "--store", str(tmp_path), "--host", "0.0.0.0"])
    assert rc == 2
    assert "LORASTACK_API_KEYS" in capsys.readouterr().err


def test_serve_needs_a_base_model(tmp_path, capsys, monkeypatch):
    from lorastack.cli import main

    monkeypatch.setenv("LORASTACK_API_KEYS", "k3y-abcdefghijklmnop")
    monkeypatch.delenv("LORASTACK_BASE_MODEL", raising=False)
    rc = main(["serve", "--local", "--store", str(tmp_path / "empty")])
    assert rc == 2
    assert "--base-model" in capsys.readouterr().err


# -- the live server -------------------------------------------------------------------------------


@pytest.mark.slow
def test_health_open_and_v1_needs_key(env):
    import httpx

    assert httpx.get(f"{env.url}/healthz").json() == {"status": "ok"}
    # anonymous callers (the probes) learn ready or not, nothing more
    assert httpx.get(f"{env.url}/readyz").json() == {"status": "ready"}
    ready = httpx.get(f"{env.url}/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert ready["status"] == "ready" and ready["quantized"] is True  # 4-bit NF4 on CPU
    r = httpx.get(f"{env.url}/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "missing_api_key"
    import openai

    with pytest.raises(openai.AuthenticationError) as exc:
        client(env.url, key="wrong").models.list()
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    # every configured key works
    assert client(env.url, key="second-key").models.list().data


@pytest.mark.slow
def test_models_lists_base_and_adapters_with_parent(env):
    models = {m.id: m for m in client(env.url).models.list().data}
    assert env.base in models and models[env.base].parent is None
    assert models["alpha"].parent == env.base and models["beta"].parent == env.base
    assert models["alpha"].root.startswith("alpha@v")
    assert client(env.url).models.retrieve("beta").id == "beta"


@pytest.mark.slow
def test_non_streaming_completion(env):
    c = client(env.url)
    r = c.chat.completions.create(model="alpha", messages=MSG, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "alpha@v1"  # the served version, like OpenAI's dated snapshot names
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # greedy decoding is deterministic; adapters really change the answer
    assert ask(c, "alpha", max_tokens=12)[0] == choice.message.content
    answers = {ask(c, m, max_tokens=12)[0] for m in (env.base, "alpha", "beta")}
    assert len(answers) == 3
    # the whole conversation counts: a system prompt and history change the prompt
    longer = [{"role": "system", "content": "Be brief."}, *MSG, {"role": "assistant", "content": "Sunny."}, *MSG]
    r2 = c.chat.completions.create(model="alpha", messages=longer, max_tokens=1, temperature=0)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 10
    # max_completion_tokens is honoured like max_tokens
    r3 = c.chat.completions.create(model="beta", messages=MSG, max_completion_tokens=3, temperature=0)
    assert r3.usage.completion_tokens <= 3


@pytest.mark.slow
def test_streaming_wire_format(env):
    body = {
        "model": "beta",
        "messages": MSG,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(env.url, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1] if c["choices"])
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    # the same text as the non-streaming answer
    assert text == ask(client(env.url), "beta", max_tokens=10)[0]
    # without include_usage: no usage chunk, no usage field
    events = sse_events(env.url, {**body, "stream_options": None})
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"]
    assert all("usage" not in e for e in events[:-1])


@pytest.mark.slow
def test_streaming_with_openai_client(env):
    c = client(env.url)
    stream = c.chat.completions.create(
        model="alpha", messages=MSG, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    assert text == ask(c, "alpha", max_tokens=8)[0]


@pytest.mark.slow
def test_seed_makes_sampling_reproducible(env):
    c = client(env.url)
    a = ask(c, "alpha", temperature=1.0, top_p=0.9, seed=7, max_tokens=16)[0]
    b = ask(c, "alpha", temperature=1.0, top_p=0.9, seed=7, max_tokens=16)[0]
    others = {ask(c, "alpha", temperature=1.0, top_p=0.9, seed=s, max_tokens=16)[0] for s in (8, 9, 10)}
    assert a == b
    assert others - {a}  # other seeds give other samples


@pytest.mark.slow
def test_stop_sequences(env):
    c = client(env.url)
    full, _, _ = ask(c, env.base, max_tokens=24)
    # a stop string taken from the middle of the greedy answer (plain printable characters)
    start = next(i for i in range(4, len(full) - 2) if full[i : i + 2].isascii() and full[i : i + 2].isprintable())
    stop = full[start : start + 2]
    cut = full.index(stop)
    text, finish, _ = ask(c, env.base, max_tokens=24, stop=[stop, "never-appears"])
    assert (text, finish) == (full[:cut], "stop")
    body = {"model": env.base, "messages": MSG, "max_tokens": 24, "temperature": 0, "stream": True, "stop": stop}
    events = sse_events(env.url, body)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == full[:cut] and events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_error_statuses_in_openai_shape(env):
    import httpx
    import openai

    c = client(env.url)
    url, auth = f"{env.url}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}

    def shape(r, status, code=None):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code:
            assert err["code"] == code
        return err

    shape(httpx.post(url, content=b"{not json", headers=auth), 400, "invalid_json")
    shape(httpx.post(url, content=b"[1, 2]", headers=auth), 400)
    assert shape(httpx.post(url, json={"model": "alpha"}, headers=auth), 400)["param"] == "messages"
    bad_role = {"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}
    assert shape(httpx.post(url, json=bad_role, headers=auth), 400)["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="alpha", messages=MSG, temperature=5)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="alpha", messages=MSG, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="alpha", messages=MSG, stream_options={"include_usage": True})
    with pytest.raises(openai.NotFoundError) as exc:
        c.chat.completions.create(model="no-such-adapter", messages=MSG)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="alpha@v99", messages=MSG)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="Not A Name!", messages=MSG)
    # a prompt longer than the context window: 400 context_length_exceeded
    long = [{"role": "user", "content": "river " * 2000}]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="alpha", messages=long)
    assert exc.value.body["code"] == "context_length_exceeded" and "1024" in exc.value.message
    # a body over the size limit: 413
    huge = {"model": "alpha", "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    shape(httpx.post(url, json=huge, headers=auth), 413, "request_too_large")
    # unknown /v1 routes answer in the same shape
    shape(httpx.get(f"{env.url}/v1/nothing-here", headers=auth), 404)


@pytest.mark.slow
def test_queue_full_answers_429_with_retry_after(tiny_llama, store, tmp_path):
    import openai

    from lorastack.serve.server import create_app

    app = create_app(store, str(tiny_llama), [KEY], ui=False, max_batch_size=1, max_queue=1)
    with live_server(app) as url:
        c = client(url)

        def one(i):
            try:
                # sampling makes an early end-of-turn unlikely, so each request holds the only slot a while
                ask(c, str(tiny_llama), temperature=1.0, seed=i, max_tokens=200)
                return "ok"
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "queue_full" and exc.body["type"] == "rate_limit_error"
                assert int(exc.response.headers["retry-after"]) >= 1
                return 429

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(one, range(12)))
    assert outcomes.count(429) >= 1 and outcomes.count("ok") >= 2


@pytest.mark.slow
def test_concurrent_mixed_adapters_batch_and_match_solo_answers(env):
    c = client(env.url)
    models = [env.base, "alpha", "beta", "alpha@v1"]
    prompts = [MSG, [{"role": "user", "content": "Capital of France?"}], [{"role": "user", "content": "Tell me a story " * 6}]]
    jobs = [(m, p) for m in models for p in prompts]
    solo = {(m, i): ask(c, m, prompts[i], max_tokens=20)[0] for m in models for i in range(len(prompts))}
    engine = env.app.state.lorastack.engine
    engine.stats["max_rows"] = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: ask(c, j[0], j[1], max_tokens=20)[0], jobs))
    for (m, p), got in zip(jobs, together):
        assert got == solo[(m, prompts.index(p))], (m, p)
    assert engine.stats["max_rows"] > 1  # they really shared decoding steps


@pytest.mark.slow
def test_client_disconnect_stops_generation(env):
    import httpx

    engine = env.app.state.lorastack.engine
    before = engine.stats["cancelled"]
    body = {"model": "alpha", "messages": MSG, "max_tokens": 900, "temperature": 1.0, "seed": 3, "stream": True}
    with httpx.stream("POST", f"{env.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines)  # the role chunk: generation has started
    deadline = time.monotonic() + 10
    while engine.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == before + 1
    assert engine.running == 0


@pytest.mark.slow
def test_hot_reload_serves_new_latest_and_keeps_pinned(env):
    c = client(env.url)
    v1_answer, _, served = ask(c, "alpha")
    assert served == "alpha@v1"
    publish(env.store, "alpha", Path(env.base), env.tmp, seed=11)  # the trainer publishes v2
    v2_answer, _, served = ask(c, "alpha")
    assert served == "alpha@v2" and v2_answer != v1_answer
    pinned, _, served = ask(c, "alpha@v1")  # a pinned version keeps answering as before
    assert (pinned, served) == (v1_answer, "alpha@v1")
    assert {m.root for m in c.models.list().data if m.id == "alpha"} == {"alpha@v2"}


@pytest.mark.slow
def test_corrupt_adapter_refused_while_others_serve(env):
    import openai

    c = client(env.url)
    ad = publish(env.store, "broken", Path(env.base), env.tmp, seed=21)
    weights = ad.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    weights.write_bytes(bytes(data))
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        c.chat.completions.create(model="broken", messages=MSG, max_tokens=4)
    msg = exc.value.body["message"]
    assert "broken@v1" in msg and "adapter_model.safetensors" in msg and "sha256" in msg
    assert exc.value.body["code"] == "adapter_invalid"
    assert ask(c, "beta")[0]  # the others keep serving
    with pytest.raises(openai.UnprocessableEntityError):  # and it stays refused
        c.chat.completions.create(model="broken", messages=MSG, max_tokens=4)


@pytest.mark.slow
def test_adapter_peft_cannot_load_refused_while_others_serve(env):
    import openai

    c = client(env.url)
    src = make_adapter(Path(env.base), env.tmp / "odd-src", seed=61)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_module"]  # well-formed files, but not for this architecture
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    env.store.publish_adapter("odd", src, {"base_model": env.base, "base_revision": None})
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        c.chat.completions.create(model="odd", messages=MSG, max_tokens=4)
    assert "odd@v1" in exc.value.body["message"] and "no_such_module" in exc.value.body["message"]
    assert {ask(c, m)[2] for m in ("alpha@v1", "beta", env.base)} == {"alpha@v1", "beta@v1", env.base}


@pytest.mark.slow
def test_unsupported_features_refused(env):
    import openai

    c = client(env.url)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kw, param in (({"tools": [tool]}, "tools"), ({"logprobs": True}, "logprobs"), ({"n": 2}, "n"),
                      ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model="alpha", messages=MSG, **kw)
        assert exc.value.body["param"] == param


@pytest.mark.slow
def test_adapter_for_another_base_refused(env):
    import openai

    c = client(env.url)
    publish(env.store, "foreign", Path(env.base), env.tmp, seed=31, base_model="someorg/other-model")
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        c.chat.completions.create(model="foreign", messages=MSG, max_tokens=4)
    assert "someorg/other-model" in exc.value.body["message"] and "--base-model" in exc.value.body["message"]
    assert "foreign" not in {m.id for m in c.models.list().data}
    assert ask(c, "alpha")[0]


@pytest.mark.slow
def test_lru_evicts_idle_adapters(tiny_llama, store, tmp_path):
    from lorastack.serve.engine import load_base_model
    from lorastack.serve.registry import AdapterRegistry

    for i, name in enumerate(["one", "two", "three"]):
        publish(store, name, tiny_llama, tmp_path, seed=40 + i)
    model, _, _ = load_base_model(str(tiny_llama))
    reg = AdapterRegistry(store, str(tiny_llama), model, max_loaded=2)
    for name in ["one", "two"]:
        reg.release(reg.acquire(name).slot)
    busy = reg.acquire("one")  # in use: must not be evicted
    reg.release(reg.acquire("three").slot)
    assert reg.loaded == ["one@v1", "three@v1"]
    assert set(reg.model.peft_config) == {busy.slot, reg.acquire("three").slot}
    reg.release(busy.slot)


@pytest.mark.slow
def test_non_streaming_client_disconnect_stops_generation(env):
    import httpx

    engine = env.app.state.lorastack.engine
    before = engine.stats["cancelled"]
    body = {"model": "beta", "messages": MSG, "max_tokens": 900, "temperature": 1.0, "seed": 5}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{env.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    deadline = time.monotonic() + 10
    while engine.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == before + 1


@pytest.mark.slow
def test_phi3_mixed_batch_matches_solo(tiny_phi3, store, tmp_path):
    """The batching engine on a Phi-3-style model: mixed-adapter rows decode as they do alone."""
    from lorastack.serve.server import create_app

    for i, name in enumerate(["p1", "p2"]):
        publish(store, name, tiny_phi3, tmp_path, seed=50 + i)
    app = create_app(store, str(tiny_phi3), [KEY], ui=False)
    with live_server(app) as url:
        c = client(url)
        models = [str(tiny_phi3), "p1", "p2"]
        solo = {m: ask(c, m, max_tokens=20) for m in models}
        assert len({s[0] for s in solo.values()}) == 3
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda m: ask(c, m, max_tokens=20), models * 2))
        assert together == [solo[m] for m in models * 2]


@pytest.mark.slow
def test_serve_local_prints_a_key_once_and_never_logs_it(tiny_llama, tmp_path):
    """`lorastack serve --local` end to end: a generated key (printed once) opens /v1; logs never show it."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    env = {**os.environ, "LORASTACK_API_KEYS": ""}
    cmd = [sys.executable, "-m", "lorastack", "serve", "--local", "--store", str(tmp_path / "store"),
           "--base-model", str(tiny_llama), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        key = None
        for line in proc.stdout:
            if "API key" in line:
                key = line.rsplit(" ", 1)[-1].strip()
                break
        assert key and key.startswith("ls-") and len(key) > 30
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert ask(client(url, key=key), str(tiny_llama), max_tokens=4)[0]
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert key not in out and key not in err  # printed once (read above), never logged


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_lru_of_one_adapter_under_concurrent_load(tiny_llama, store, tmp_path):
    """With room for one adapter, concurrent requests for two still get their own adapter's answer;
    eviction waits until no request uses an adapter, and never deadlocks with decoding."""
    from lorastack.serve.server import create_app

    for i, name in enumerate(["one", "two"]):
        publish(store, name, tiny_llama, tmp_path, seed=70 + i)
    app = create_app(store, str(tiny_llama), [KEY], ui=False, max_loaded_adapters=1)
    with live_server(app) as url:
        c = client(url)
        solo = {m: ask(c, m, max_tokens=12) for m in ("one", "two", "one")}
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda m: ask(c, m, max_tokens=12), ["one", "two"] * 4))
        assert together == [solo[m] for m in ["one", "two"] * 4]
        registry = app.state.lorastack.registry
        assert len(registry.loaded) == 1  # back within the bound once requests finished
        assert len(registry.model.peft_config) == 1
