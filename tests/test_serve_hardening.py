"""Hardening of the inference server (issue 11 items 1, 2, 6, 7; issue 7 item 6): hostile request bodies,
malformed store objects, keys and sign-in throttling, big prompts off the event loop, the base model served
from an empty store, and /v1/models following LATEST. Each test names the case it covers."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import KEY, MSG, ask, client, live_server, make_adapter, publish

AUTH = {"Authorization": f"Bearer {KEY}"}


# -- request parsing and validation (no server) ------------------------------------------------------


def _parse_error(body: bytes):
    from lorastack.serve.api import APIError, parse_json_body

    with pytest.raises(APIError) as exc:
        parse_json_body(body)
    return exc.value


@pytest.mark.parametrize(
    "case,body",
    [
        ("nesting 100k deep", b"[" * 100_000 + b"]" * 100_000),
        ("nesting 50k deep in an object", b'{"model": "x", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("nesting just over the limit", b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"),
        ("lone high surrogate in a string", b'{"model": "\\ud800"}'),
        ("lone low surrogate in a key", b'{"\\udc00": 1}'),
        ("integer literal over 4300 digits", b'{"max_tokens": ' + b"9" * 5000 + b"}"),
        ("NaN literal", b'{"temperature": NaN}'),
        ("Infinity literal", b'{"temperature": -Infinity}'),
        ("not UTF-8", b'{"model": "\xff\xfe"}'),
        ("truncated", b'{"model": "x", "messages": ['),
    ],
)
def test_parser_edges_are_400_invalid_json(case, body):
    err = _parse_error(body)
    assert (err.status, err.code) == (400, "invalid_json"), case
    assert err.message.startswith("We could not parse the JSON body")


def test_parser_accepts_a_paired_surrogate_escape():
    from lorastack.serve.api import parse_json_body

    assert parse_json_body(b'{"content": "\\ud83d\\ude00"}') == {"content": "\U0001f600"}


def _validate(**fields):
    from pydantic import ValidationError

    from lorastack.serve.api import APIError, ChatCompletionRequest, _from_validation

    body = {"model": "alpha", "messages": MSG, **fields}
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        return _from_validation(exc)
    refused = req.unsupported()
    return APIError(400, refused[1], param=refused[0], code="unsupported_parameter") if refused else None


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"temperature": 2.0001}, "temperature"),
        ({"temperature": -1e-300}, "temperature"),
        ({"temperature": 5e300}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),  # no string coercion
        ({"temperature": True}, "temperature"),  # no bool coercion
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 5e300}, "top_p"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.0}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"n": True}, "n"),
        ({"n": 2}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "text", "extra": 1}}, "response_format.extra"),
        ({"response_format": "text"}, "response_format"),
        ({"tools": []}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"model": ""}, "model"),
        ({"model": 7}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages.0.tool_calls"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_hostile_fields_are_400_naming_the_parameter(fields, param):
    err = _validate(**fields)
    assert err is not None, f"{fields} was accepted"
    assert err.status == 400 and err.param == param, (fields, err.param, err.message)


def test_unknown_field_is_refused_like_openai():
    err = _validate(frobnicate=1)
    assert err.code == "unknown_parameter" and err.message == "Unrecognized request argument supplied: frobnicate"


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-300, "top_p": 1e-300},  # extreme but inside OpenAI's ranges
        {"temperature": 0, "top_p": 1},
        {"temperature": 2, "seed": -(2**63)},
        {"seed": 2**63 - 1, "n": 1, "stream": False, "logprobs": False},
        {"response_format": {"type": "text"}, "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0.0},
        {"user": "u1", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": None},
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}, *MSG]},
        {"messages": [*MSG, {"role": "assistant", "content": "x", "refusal": None, "tool_calls": None}, *MSG]},
    ],
)
def test_valid_edge_requests_are_accepted(fields):
    assert _validate(**fields) is None


def test_model_ref_syntax_is_strict():
    from lorastack.store import StoreError, check_name, parse_adapter_ref

    assert parse_adapter_ref("plant-care-small") == ("plant-care-small", None)
    assert parse_adapter_ref("plant-care-small@v12") == ("plant-care-small", "v12")
    for bad in ("plant-care-small@", "plant-care-small@12", "a@v1@v2", "a@v1\n", "@v1", "Upper@v1", "a@v"):
        with pytest.raises(StoreError):
            parse_adapter_ref(bad)
    with pytest.raises(StoreError):  # "$" would let a trailing newline through
        check_name("travel\n")


# -- sampling at the edges of the accepted ranges ---------------------------------------------------------


def test_sampling_is_safe_at_extreme_valid_values():
    """temperature / top_p of 1e-300 (valid per OpenAI) used to give NaN probabilities and a 500."""
    import torch

    from lorastack.serve.engine import SamplingParams, sample_token

    logits = torch.tensor([1.0, 3.0, 2.0, -50.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(1, temperature=1e-300), gen) == 1
    assert sample_token(logits, SamplingParams(1, temperature=1.0, top_p=1e-300), gen) == 1
    assert sample_token(logits, SamplingParams(1, temperature=2.0), gen) in (0, 1, 2, 3)
    with pytest.raises(ValueError):
        sample_token(torch.tensor([float("nan"), 1.0]), SamplingParams(1, temperature=1.0), gen)
    with pytest.raises(ValueError):
        sample_token(logits, SamplingParams(1, temperature=float("inf")), gen)


# -- the store read path: every malformed object is "unavailable" with a reason ---------------------------


def _malform(store, good_dir: Path) -> dict[str, str]:
    """Copies of a good published version, each broken one way; returns name -> the case it covers."""
    from lorastack.store import MANIFEST

    cases = {}

    def clone(name: str, case: str) -> Path:
        dest = store.adapters_dir / name / "v1"
        shutil.copytree(good_dir, dest)
        (store.adapters_dir / name / "LATEST").write_text("v1\n")
        cases[name] = case
        return dest

    clone("latest-not-utf8", "LATEST holding non-UTF-8 bytes")
    (store.adapters_dir / "latest-not-utf8" / "LATEST").write_bytes(b"\xff\xfev1\n")
    clone("latest-garbage", "LATEST naming no version")
    (store.adapters_dir / "latest-garbage" / "LATEST").write_text("newest\n")
    clone("latest-missing", "LATEST naming a version that is not there")
    (store.adapters_dir / "latest-missing" / "LATEST").write_text("v9\n")
    (clone("manifest-list", "a manifest that is a JSON list") / MANIFEST).write_text("[1, 2]")
    d = clone("files-string", "a manifest whose files is a string")
    m = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**m, "files": "adapter_model.safetensors"}))
    (clone("manifest-latin1", "a non-UTF-8 manifest") / MANIFEST).write_bytes(
        json.dumps(m).replace('"name"', '"n\xe4me"').encode("latin-1")
    )
    (clone("manifest-deep", "a manifest nested 100k deep") / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    (clone("manifest-hugeint", "a manifest with a 5000-digit integer") / MANIFEST).write_text('{"x": ' + "7" * 5000 + "}")
    d = clone("files-escape", "a files entry pointing outside the version directory")
    (d / MANIFEST).write_text(json.dumps({**m, "files": {"../../../LATEST": "0" * 64}}))
    d = clone("base-not-str", "a base_model that is not a string")
    (d / MANIFEST).write_text(json.dumps({**m, "base_model": ["x"]}))
    return cases


def test_malformed_store_objects_raise_store_error_with_a_reason(tiny_llama, store, tmp_path):
    """Store.adapter never raises anything but StoreError; adapter_catalog never raises at all."""
    from lorastack.store import StoreError

    good = publish(store, "good", tiny_llama, tmp_path, seed=1)
    cases = _malform(store, good.path)
    for name, case in cases.items():
        with pytest.raises(StoreError) as exc:
            store.adapter(name)
        assert str(exc.value), case
    catalog = {e.name: e for e in store.adapter_catalog()}
    assert catalog["good"].versions and not catalog["good"].errors
    for name, case in cases.items():
        entry = catalog[name]
        assert entry.latest_error or entry.errors or entry.latest == "v9" or name == "base-not-str", case


@pytest.mark.slow
def test_malformed_store_objects_are_skipped_and_named_when_requested(tiny_llama, tmp_path):
    """/v1/models answers 200 and omits every malformed adapter; asking for one is a 422 naming it, with
    no absolute store path; the good adapter serves on."""
    import httpx

    from lorastack.serve.server import create_app
    from lorastack.store import Store

    store = Store(tmp_path / "store").init()
    good = publish(store, "good", tiny_llama, tmp_path, seed=1)
    cases = _malform(store, good.path)
    with live_server(create_app(store, str(tiny_llama), [KEY], ui=False)) as url:
        r = httpx.get(f"{url}/v1/models", headers=AUTH)
        assert r.status_code == 200
        ids = {m["id"] for m in r.json()["data"]}
        # a broken LATEST makes only the name unavailable: the intact version stays listed (and servable)
        intact = {f"{n}@v1" for n in cases if n.startswith("latest-")}
        assert ids == {str(tiny_llama), "good", "good@v1", *intact}
        for name, case in cases.items():
            body = {"model": name, "messages": MSG, "max_tokens": 2}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH)
            assert r.status_code == 422, (case, r.text)
            err = r.json()["error"]
            assert err["code"] == "adapter_invalid" and name in err["message"], case
            assert str(store.root) not in r.text, case  # 422s never show absolute store paths
        ready = httpx.get(f"{url}/readyz", headers=AUTH).json()
        reported = {u["id"].split("@")[0] for u in ready["adapters_unavailable"]}
        assert set(cases) <= reported
        assert ask(client(url), "good")[0]


# -- unknown routes and methods ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tiny_llama, tmp_path_factory):
    """A live server (no UI) over a store with adapter alpha."""
    from lorastack.serve.server import create_app
    from lorastack.store import Store

    tmp = tmp_path_factory.mktemp("hardening")
    store = Store(tmp / "store").init()
    publish(store, "alpha", tiny_llama, tmp, seed=1)
    app = create_app(store, str(tiny_llama), [KEY], ui=False, max_batch_size=8)
    with live_server(app) as url:
        yield argparse.Namespace(url=url, store=store, base=str(tiny_llama), tmp=tmp, app=app)


def _openai_shape(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.slow
def test_unknown_routes_and_methods_answer_in_openai_shape(srv):
    import httpx

    err = _openai_shape(httpx.post(f"{srv.url}/V1/chat/completions", json={}, headers=AUTH), 404)
    assert err["code"] == "not_found"
    _openai_shape(httpx.get(f"{srv.url}/nothing/here"), 404)
    r = httpx.get(f"{srv.url}/v1/chat/completions", headers=AUTH)
    assert _openai_shape(r, 405)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    _openai_shape(httpx.delete(f"{srv.url}/healthz"), 405)


@pytest.mark.slow
def test_hostile_bodies_over_http_are_4xx_in_openai_shape(srv):
    import httpx

    url = f"{srv.url}/v1/chat/completions"
    cases = [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "alpha", "messages": [], "max_tokens": ' + b"1" * 5000 + b"}",
        json.dumps({"model": "alpha@", "messages": MSG}).encode(),
        json.dumps({"model": "alpha", "messages": MSG, "stream": "yes"}).encode(),
        json.dumps({"model": "alpha", "messages": MSG, "functions": [{"name": "f"}]}).encode(),
    ]
    for body in cases:
        err = _openai_shape(httpx.post(url, content=body, headers=AUTH), 400)
        assert err["code"] in ("invalid_json", "invalid_value", "invalid_model", "unsupported_parameter")
    err = _openai_shape(httpx.post(url, json={"model": "alpha@", "messages": MSG}, headers=AUTH), 400)
    assert err["param"] == "model" and "alpha@" in err["message"]


@pytest.mark.slow
def test_extreme_valid_sampling_beside_good_streams(srv):
    """The issue's batch poisoning: extreme temperature/top_p/seed among concurrent good requests. All
    answer 200, and the good ones get exactly the answer they get alone."""
    c = client(srv.url)
    good = [[{"role": "user", "content": f"Question {i} about the river?"}] for i in range(4)]
    solo = [ask(c, "alpha", m, max_tokens=16)[0] for m in good]
    extreme = [
        {"temperature": 1e-300, "top_p": 1e-300},
        {"temperature": 2, "top_p": 1e-300, "seed": -(2**63)},
        {"temperature": 1e-300, "seed": 2**63 - 1},
        {"temperature": 2, "top_p": 1, "seed": 0},
    ]

    def run(job):
        kind, i = job
        if kind == "good":
            return ask(c, "alpha", good[i], max_tokens=16)[0]
        return ask(c, "alpha", MSG, max_tokens=16, **extreme[i])[1]

    jobs = [("good", i) for i in range(4)] + [("extreme", i) for i in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        out = list(pool.map(run, jobs))
    assert out[:4] == solo
    assert all(f in ("stop", "length") for f in out[4:])


@pytest.mark.slow
def test_a_row_that_fails_is_removed_and_the_batch_goes_on(tiny_llama):
    """Generation failures are isolated: one poisoned request (sampling settings that slipped past the
    edge, here NaN) among concurrent good ones gets an error; the others finish with their solo answers."""
    import queue

    from lorastack.chat import render_prompt
    from lorastack.serve.engine import BASE, Engine, GenerationRequest, SamplingParams, context_length, eos_token_ids
    from lorastack.serve.engine import load_base_model as load

    model, tok, _ = load(str(tiny_llama))
    engine = Engine(lambda: model, tok, eos_ids=eos_token_ids(model, tok), max_context=context_length(model, tok),
                    max_batch_size=8).start()
    try:
        def submit(text, **params):
            events: queue.Queue = queue.Queue()
            prompt = render_prompt(tok, [{"role": "user", "content": text}])
            engine.submit(GenerationRequest(prompt, BASE, SamplingParams(12, **params), events.put))
            return events

        def collect(events):
            parts = []
            while True:
                ev = events.get(timeout=60)
                if ev.kind == "delta":
                    parts.append(ev.text)
                else:
                    return ev.kind, "".join(parts)

        texts = [f"Tell me about boat number {i}" for i in range(4)]
        solo = [collect(submit(t, temperature=0)) for t in texts]
        engine.stats["max_rows"] = 0
        streams = [submit(t, temperature=0) for t in texts[:2]]
        poisoned = submit("poison", temperature=float("nan"))
        streams += [submit(t, temperature=0) for t in texts[2:]]
        results = [collect(s) for s in streams]
        assert collect(poisoned)[0] == "error"
        assert results == solo
        assert all(kind == "done" for kind, _ in results)
        assert engine.stats["max_rows"] > 1  # they did share steps with the poisoned row
    finally:
        engine.stop()


# -- big prompts stay off the event loop ----------------------------------------------------------------


@pytest.mark.slow
def test_healthz_answers_within_a_second_while_4mb_prompts_are_handled(srv):
    import httpx

    big = {"model": "alpha", "messages": [{"role": "user", "content": "river " * 650_000}], "max_tokens": 4}
    assert 3_800_000 < len(json.dumps(big)) < 4 << 20
    results = []

    def send():
        results.append(httpx.post(f"{srv.url}/v1/chat/completions", json=big, headers=AUTH, timeout=120))

    senders = [threading.Thread(target=send) for _ in range(3)]
    for t in senders:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in senders):
        t0 = time.monotonic()
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.02)
    for t in senders:
        t.join()
    assert worst < 1.0, f"/healthz took {worst:.2f} s while big prompts were handled"
    assert [r.status_code for r in results] == [400] * 3
    assert all(r.json()["error"]["code"] == "context_length_exceeded" for r in results)


def test_prompt_renderer_bounds_size_before_any_work(tiny_llama):
    """A conversation too large to fit is refused from its byte length, without rendering; one that fits
    renders off the event loop to the same tokens the trainer's render_prompt gives."""
    import asyncio

    from transformers import AutoTokenizer

    from lorastack.chat import render_prompt
    from lorastack.serve.prompts import PromptRefused, PromptRenderer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    renderer = PromptRenderer(tok, 1024)
    try:
        big = [{"role": "user", "content": "x" * (renderer.max_bytes + 1)}]
        assert renderer.too_large(big) == renderer.max_bytes + 1
        with pytest.raises(PromptRefused) as exc:
            asyncio.run(renderer.render(big))
        assert exc.value.code == "context_length_exceeded"
        assert asyncio.run(renderer.render(MSG)) == render_prompt(tok, MSG)
        with pytest.raises(PromptRefused) as exc:  # what the chat code refuses is a 400, not a 500
            asyncio.run(renderer.render([["not", "a", "message"]]))
        assert exc.value.code == "invalid_messages"
    finally:
        renderer.close()


# -- keys and throttling -------------------------------------------------------------------------------


def test_failure_limiter_throttles_per_client_and_forgets():
    from lorastack.serve.auth import FailureLimiter

    now = [0.0]
    lim = FailureLimiter(max_failures=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert lim.retry_after("a") is None
        lim.failed("a")
    assert lim.retry_after("a") == 60 and lim.retry_after("b") is None
    now[0] = 30
    assert lim.retry_after("a") == 30
    now[0] = 61
    assert lim.retry_after("a") is None


def test_client_address_trusts_only_the_configured_proxy_hops():
    from lorastack.serve.auth import client_address

    scope = {"client": ("10.0.0.9", 1), "headers": [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.7")]}
    assert client_address(scope) == "10.0.0.9"  # no proxy trusted: the socket peer
    assert client_address(scope, proxy_hops=1) == "203.0.113.7"  # what ACA's ingress appended, not the spoof


def test_weak_keys_are_refused_at_start(tmp_path, capsys, monkeypatch):
    from lorastack.cli import main
    from lorastack.serve.auth import generate_key, weak_key_problems

    assert weak_key_problems([generate_key()]) == []
    assert len(weak_key_problems(["k", "a" * 20, "ok-but-has space 123"])) == 3
    monkeypatch.setenv("LORASTACK_API_KEYS", f"{generate_key()},x")
    rc = main(["serve", "--store", str(tmp_path), "--base-model", "m"])
    err = capsys.readouterr().err
    assert rc == 2 and "key #2 has 1 characters" in err and "secrets.token_urlsafe" in err


def test_access_log_never_shows_a_query_string():
    from lorastack.serve.auth import ScrubQueryStrings

    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/models?api_key=sk-SECRET", "1.1", 401), None)
    ScrubQueryStrings().filter(record)
    assert "sk-SECRET" not in record.getMessage() and "/v1/models?[query removed]" in record.getMessage()


@pytest.mark.slow
def test_wrong_keys_are_throttled_and_query_string_keys_neither_work_nor_get_logged(tiny_llama, store):
    import httpx
    import uvicorn
    from test_serve import free_port

    from lorastack.serve.server import create_app

    app = create_app(store, str(tiny_llama), [KEY], ui=False, max_auth_failures=3)
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    grab = Grab()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", access_log=True))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        access.addHandler(grab)  # after uvicorn has configured its loggers
        r = httpx.get(f"{url}/v1/models?api_key={KEY}&key={KEY}")
        assert r.status_code == 401  # a key in the query string is never read
        assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
        wrong = {"Authorization": "Bearer wrong-key-000000"}
        assert [httpx.get(f"{url}/v1/models", headers=wrong).status_code for _ in range(3)] == [401] * 3
        r = httpx.get(f"{url}/v1/models", headers=wrong)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "too_many_failed_attempts"
        assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 429  # the address is throttled
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        access.removeHandler(grab)
    assert any("/v1/models" in line for line in records)
    assert not any(KEY in line for line in records)


# -- what the store holds never stops the server (issue 7 item 6) -----------------------------------------


@pytest.mark.slow
def test_empty_store_serves_the_base_model_from_the_environment(tiny_llama, tmp_path):
    """`lorastack serve` on an empty store (mode 0555, as the app's read-only mount; root ignores the mode),
    told its base model only by LORASTACK_BASE_MODEL (as provisioning does), starts and answers;
    /v1/models lists just the base, and nothing in its output is a traceback."""
    import os
    import subprocess

    import httpx
    from test_serve import free_port

    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    port = free_port()
    env = {**os.environ, "LORASTACK_API_KEYS": "k3y-" + "abcdefghijklmnop", "LORASTACK_BASE_MODEL": str(tiny_llama)}
    cmd = [sys.executable, "-m", "lorastack", "serve", "--store", str(store), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        c = client(url, key=env["LORASTACK_API_KEYS"])
        assert [m.id for m in c.models.list().data] == [str(tiny_llama)]
        assert ask(c, str(tiny_llama), max_tokens=4)[0]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        store.chmod(0o755)
    assert "Traceback" not in out


@pytest.mark.slow
def test_foreign_base_and_corrupt_adapters_are_reported_while_the_rest_serves(tiny_llama, tmp_path, caplog):
    from lorastack.serve.server import create_app
    from lorastack.store import Store

    store = Store(tmp_path / "store").init()
    publish(store, "local", tiny_llama, tmp_path, seed=1)
    publish(store, "foreign", tiny_llama, tmp_path, seed=2, base_model="someorg/another-base")
    bad = publish(store, "corrupt", tiny_llama, tmp_path, seed=3)
    (bad.path / "adapter_model.safetensors").write_bytes(b"not weights")
    caplog.set_level(logging.WARNING, logger="lorastack.serve")
    import openai

    with live_server(create_app(store, str(tiny_llama), [KEY], ui=False)) as url:
        c = client(url)
        assert {m.id for m in c.models.list().data} == {str(tiny_llama), "local", "local@v1"}
        for name, why in (("foreign", "someorg/another-base"), ("corrupt", "sha256")):
            with pytest.raises(openai.UnprocessableEntityError) as exc:
                c.chat.completions.create(model=name, messages=MSG, max_tokens=2)
            assert f"{name}@v1" in exc.value.message and why in exc.value.message
        assert ask(c, "local")[0]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "foreign@v1" in logged and "corrupt@v1" in logged


@pytest.mark.slow
def test_models_list_every_version_and_the_server_follows_latest(srv):
    """/v1/models lists `name` (= LATEST) and every verified `name@vN`, marking the promoted one; when
    another process moves LATEST (a new promotion, then a rollback), the next request follows it. A
    published version that is not promoted is listed but `name` does not serve it."""
    from lorastack.store import PROMOTIONS, promotion_entry, write_bytes_atomic, write_json_atomic

    c = client(srv.url)
    v1_answer, _, served = ask(c, "alpha")
    assert served == "alpha@v1"
    v2 = publish(srv.store, "alpha", Path(srv.base), srv.tmp, seed=12)  # publish_adapter promotes (LATEST=v2)
    root = srv.store.adapters_dir / "alpha"
    # an unpromoted v3: published, LATEST untouched (what `promote: never` leaves)
    src = make_adapter(Path(srv.base), srv.tmp / "alpha-v3-src", seed=13)
    v3 = srv.store.publish_adapter("alpha", src, {"base_model": srv.base, "base_revision": None})
    write_bytes_atomic(root / "LATEST", b"v2\n")

    def cards():
        return {m.id: m.model_dump() for m in c.models.list().data if m.id.startswith("alpha")}

    listed = cards()
    assert set(listed) == {"alpha", "alpha@v1", "alpha@v2", "alpha@v3"}
    assert listed["alpha"]["root"] == "alpha@v2" and listed["alpha"]["promoted"] is True
    assert [v for v, card in listed.items() if card["promoted"] and "@" in v] == ["alpha@v2"]
    v2_answer, _, served = ask(c, "alpha")
    assert served == v2.ref and v2_answer != v1_answer
    # a rollback by another process: history first, then LATEST
    history = [promotion_entry("v1", "promote", "first"), promotion_entry("v2", "promote", "better"),
               promotion_entry("v1", "rollback", "v2 regressed")]
    write_json_atomic(root / PROMOTIONS, history)
    write_bytes_atomic(root / "LATEST", b"v1\n")
    assert ask(c, "alpha")[:3:2] == (v1_answer, "alpha@v1")
    assert cards()["alpha"]["root"] == "alpha@v1" and cards()["alpha@v1"]["promoted"] is True
    assert ask(c, v3.ref)[2] == "alpha@v3"  # the unpromoted version answers when pinned


def test_runs_view_reads_results_and_eval_and_survives_garbage(store, tmp_path):
    from lorastack.progress import RunReporter
    from lorastack.serve import runs_view
    from lorastack.store import write_json_atomic

    rep = RunReporter(store, "run-1")
    for step in range(1, 6):
        rep.record(step, train_loss=3.0 - 0.3 * step)
    rep.record(5, valid_loss=2.1)
    points, message = runs_view.loss_points(store, "run-1")
    assert [p["loss"] for p in points if p["series"] == "training"] == pytest.approx([2.7, 2.4, 2.1, 1.8, 1.5])
    assert [(p["step"], p["loss"]) for p in points if p["series"] == "validation"] == [(5, 2.1)]
    assert "5 training and 1 validation" in message
    assert runs_view.list_runs(store) == ["run-1"]
    (store.run_dir("run-2")).mkdir(parents=True)
    (store.run_dir("run-2") / "results.csv").write_bytes(b"\xff\x00garbage\nstep,train_loss\nx,nan\n")
    assert runs_view.loss_points(store, "run-2")[0] == []
    vdir = store.adapters_dir / "a" / "v1"
    vdir.mkdir(parents=True)
    (vdir / "manifest.json").write_text(json.dumps({"run_id": "run-1", "files": {}}))
    assert runs_view.run_adapter(store, "run-1") == "a@v1"
    write_json_atomic(vdir / "eval.json", {
        "adapter": "a@v1", "against": "base", "data": [],
        "metrics": {"base": {"loss": 2.5, "perplexity": 12.18, "token_accuracy": 0.41, "chrf": 20.5},
                    "a@v1": {"loss": 1.9, "perplexity": 6.69, "token_accuracy": 0.55, "chrf": 31.0}},
        "samples": [{"prompt": [{"role": "user", "content": "Hi?"}], "reference": "Hello.", "base": "Eh",
                     "a@v1": "Hello!"}],
        "created_at": "2026-12-01T00:00:00Z"})
    heads, rows, sheads, srows, _ = runs_view.eval_tables(store, "a@v1")
    assert heads == ["metric", "base", "a@v1"] and ["perplexity", "12.18", "6.69"] in rows
    assert srows == [["Hi?", "Hello.", "Eh", "Hello!"]] and sheads[:2] == ["prompt", "reference"]
    (vdir / "eval.json").write_text("[")
    assert "cannot be read" in runs_view.eval_tables(store, "a@v1")[4]
    assert math.isfinite(len(runs_view.evaluated_versions(store)))
