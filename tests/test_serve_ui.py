"""The Gradio chat UI at /ui: its login (an API key as password) guarding every UI route but the login
page's, throttled failed sign-ins, ACA Easy Auth headers, and real use driven in headless Chromium
(Debian's package, driven by Playwright; never `playwright install`): chat, compare mode, the system
prompt from the adapter's manifest, and the Runs view (loss curves, eval table)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import KEY, client, live_server, make_adapter, publish

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def ui_env(tiny_llama, tmp_path_factory):
    from lorastack.serve.server import create_app
    from lorastack.store import Store

    tmp = tmp_path_factory.mktemp("serve-ui")
    store = Store(tmp / "store").init()
    src = make_adapter(tiny_llama, tmp / "alpha-src", seed=1)
    manifest = {"base_model": str(tiny_llama), "base_revision": None, "run_id": "run-alpha",
                "system_prompt": ALPHA_SYSTEM}
    store.publish_adapter("alpha", src, manifest)
    publish(store, "beta", tiny_llama, tmp, seed=2)
    write_run_and_eval(store)
    with live_server(create_app(store, str(tiny_llama), [KEY])) as url:
        yield url, str(tiny_llama), store, tmp


ALPHA_SYSTEM = "You are a river guide. Be brief."
EVAL = {
    "adapter": "alpha@v1", "against": "base", "data": [{"path": "valid.jsonl", "sha256": "0" * 64}],
    "metrics": {"base": {"loss": 2.91, "perplexity": 18.36, "token_accuracy": 0.312, "chrf": 17.4, "examples": 12,
                         "tokens": 840},
                "alpha@v1": {"loss": 1.72, "perplexity": 5.58, "token_accuracy": 0.547, "chrf": 33.9, "examples": 12,
                             "tokens": 840}},
    "samples": [{"prompt": [{"role": "user", "content": "Where can I launch a kayak?"}],
                 "reference": "At the north slipway.", "base": "Kayak kayak.", "alpha@v1": "The north slipway."}],
    "created_at": "2026-12-01T22:00:00Z",
}


def write_run_and_eval(store) -> None:
    """A run's results.csv written by the trainer's own reporter, and the eval.json `lorastack eval` leaves."""
    from lorastack.progress import RunReporter
    from lorastack.store import EVAL_FILE, write_json_atomic

    rep = RunReporter(store, "run-alpha")
    for step in range(1, 21):
        rep.record(step, train_loss=3.2 * 0.93**step + 0.05 * (step % 3))
        if step % 5 == 0:
            rep.record(step, valid_loss=3.3 * 0.95**step)
    write_json_atomic(store.adapters_dir / "alpha" / "v1" / EVAL_FILE, EVAL)


@pytest.mark.slow
def test_ui_needs_login_with_an_api_key(ui_env):
    import httpx

    url = ui_env[0]
    assert httpx.get(f"{url}/ui/config").status_code == 401
    # Gradio's own routes that it leaves open (schema, info, queue, files) are behind the same sign-in
    gated = [("GET", "/ui/gradio_api/info"), ("GET", "/ui/gradio_api/openapi.json"), ("GET", "/ui/gradio_api/app_id"),
             ("GET", "/ui/gradio_api/startup-events"), ("POST", "/ui/gradio_api/queue/join"),
             ("POST", "/ui/gradio_api/call/v2/chat"), ("POST", "/ui/gradio_api/upload"), ("GET", "/ui/monitoring"),
             ("GET", "/ui/gradio_api/file=/etc/passwd")]
    for method, path in gated:
        assert httpx.request(method, f"{url}{path}", json={}).status_code == 401, path
    # what the browser needs to show the login form stays public, and shows nothing of the app
    page = httpx.get(f"{url}/ui/")
    assert page.status_code == 200 and "auth_required" in page.text and "alpha" not in page.text
    assert httpx.get(f"{url}/ui/theme.css").status_code == 200
    with httpx.Client(base_url=url) as c:
        bad = c.post("/ui/login", data={"username": "me", "password": "wrong"})
        assert bad.status_code >= 400
        assert c.get("/ui/config").status_code == 401
        ok = c.post("/ui/login", data={"username": "me", "password": KEY})
        assert ok.status_code == 200
        assert c.get("/ui/config").status_code == 200
        assert c.get("/ui/gradio_api/info").status_code == 200
        # the programmatic call routes (a 500 with a valid session before) answer 404, never 500
        assert c.post("/ui/gradio_api/call/v2/chat", json={"data": ["hi"]}).status_code == 404
        # the UI login does not open the API: /v1 still wants the Bearer key
        assert c.get("/v1/models").status_code == 401


@pytest.mark.slow
def test_idle_ui_queue_stops_polling_every_millisecond(ui_env, monkeypatch):
    """Issue 12: Gradio's queue polled every 1 ms (plus 10 ms for progress) on the event loop serving /v1,
    costing an idle server ~4 % of a core; idle, it now wakes about 40 times a second."""
    import asyncio
    import time
    import types

    import gradio.queueing
    import httpx

    url = ui_env[0]
    sleeps = []

    async def counted_sleep(delay, *args, **kwargs):
        sleeps.append(delay)
        return await asyncio.sleep(delay, *args, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio) if not k.startswith("__")})
    proxy.sleep = counted_sleep
    monkeypatch.setattr(gradio.queueing, "asyncio", proxy)
    time.sleep(1.5)  # past the idle threshold
    sleeps.clear()
    time.sleep(2.0)
    assert 0 < len(sleeps) < 200, f"{len(sleeps)} queue polls in 2 s of idle"
    # the server still answers at once after the idle spell
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_failed_sign_ins_are_throttled(tiny_llama, store):
    import httpx

    from lorastack.serve.server import create_app

    app = create_app(store, str(tiny_llama), [KEY], max_auth_failures=3)
    with live_server(app) as url, httpx.Client(base_url=url) as c:
        tries = [c.post("/ui/login", data={"username": "me", "password": f"guess-{i}"}).status_code for i in range(3)]
        assert all(400 <= t < 500 and t != 429 for t in tries)
        r = c.post("/ui/login", data={"username": "me", "password": KEY})  # even the right key, for now
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # the API shares the budget: a wrong key from the same address is throttled too
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 429


@pytest.mark.slow
def test_ui_behind_easy_auth_headers(tiny_llama, store):
    import httpx

    from lorastack.serve.server import create_app

    app = create_app(store, str(tiny_llama), [KEY], trust_easy_auth=True)
    with live_server(app) as url:
        assert httpx.get(f"{url}/ui/config").status_code == 401
        r = httpx.get(f"{url}/ui/config", headers={"X-MS-CLIENT-PRINCIPAL-NAME": "ana@contoso.com"})
        assert r.status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"X-MS-CLIENT-PRINCIPAL-NAME": "ana@contoso.com"}).status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200


def set_slider(page, elem_id: str, value: str) -> None:
    """Type a value into a Gradio slider's number box and wait until the slider itself has taken it."""
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    for _ in range(3):  # a value typed while the accordion is still opening can be dropped: type it again
        box.fill(value)
        box.press("Tab")  # commit (change event)
        try:
            expect(slider).to_have_value(value, timeout=3000)
            return
        except AssertionError:
            continue
    expect(slider).to_have_value(value)


def _norm(text: str) -> str:
    return " ".join(text.split())


SHOTS = Path(os.environ.get("LORASTACK_SCREENSHOTS", "")) if os.environ.get("LORASTACK_SCREENSHOTS") else None


def shot(page, name: str) -> None:
    """Save a full-page screenshot when $LORASTACK_SCREENSHOTS names a folder (to look at by eye)."""
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def login(page, url: str) -> None:
    page.goto(f"{url}/ui/")
    page.get_by_label("username").fill("tester")
    page.get_by_label("password").fill(KEY)
    page.get_by_role("button", name="Login").click()


@pytest.mark.slow
@pytest.mark.browser
def test_chat_in_headless_chromium(ui_env):
    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    url, base, _store, _tmp = ui_env
    api = client(url)
    system = ALPHA_SYSTEM
    q1, q2 = "What is the weather like by the river today?", "And tomorrow?"

    def api_answer(messages):
        r = api.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
        return r.choices[0].message.content

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60000)
            login(page, url)

            # the adapter dropdown lists every servable name and version, the promoted one marked
            page.locator("#adapter input").click()
            options = page.get_by_role("option")
            expect(options).to_have_count(5)
            assert {t.strip(" ✓\n") for t in options.all_inner_texts()} == {
                f"{base} (base model)", "alpha (LATEST: v1)", "alpha@v1 (promoted)", "beta (LATEST: v1)",
                "beta@v1 (promoted)",
            }
            page.get_by_role("option", name="beta (LATEST: v1)", exact=True).click()
            expect(page.locator("#system textarea")).to_have_value("")  # beta's manifest has no system prompt
            page.locator("#adapter input").click()
            page.get_by_role("option", name="alpha (LATEST: v1)", exact=True).click()
            # the system prompt defaults to the one alpha was trained with (its manifest's)
            expect(page.locator("#system textarea")).to_have_value(system)
            page.get_by_text("Generation settings").click()
            set_slider(page, "max_tokens", "12")
            set_slider(page, "temperature", "0")

            # count how many different partial replies the browser renders: streaming shows several
            page.evaluate(
                """() => { window.__seen = new Set();
                new MutationObserver(() => { const b = document.querySelectorAll('[data-testid=bot]');
                  if (b.length) window.__seen.add(b[b.length - 1].innerText); })
                .observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
            )
            box = page.locator("#chat-input textarea")
            box.fill(q1)
            box.press("Enter")
            bot = page.locator("[data-testid=bot]")
            expected1 = api_answer([{"role": "system", "content": system}, {"role": "user", "content": q1}])
            expect(bot.first).to_have_text(_norm(expected1), timeout=60000)
            reply1 = bot.first.inner_text()

            # multi-turn: the second answer is the adapter's answer to the whole history
            box.fill(q2)
            box.press("Enter")
            history = [
                {"role": "system", "content": system},
                {"role": "user", "content": q1},
                {"role": "assistant", "content": expected1},
                {"role": "user", "content": q2},
            ]
            expected2 = api_answer(history)
            expect(bot).to_have_count(2, timeout=60000)
            expect(bot.nth(1)).to_have_text(_norm(expected2), timeout=60000)
            assert _norm(reply1) == _norm(expected1)

            # a long sampled reply streams: the browser shows it growing
            set_slider(page, "max_tokens", "400")
            set_slider(page, "temperature", "1")
            page.evaluate("() => window.__seen.clear()")
            box.fill("Tell me a long story.")
            box.press("Enter")
            expect(bot).to_have_count(3, timeout=60000)
            # partial replies keep arriving: at least three different renderings of the growing reply
            page.wait_for_function("() => window.__seen.size >= 3", timeout=60000)
            page.wait_for_timeout(1000)
            seen = [_norm(t) for t in page.evaluate("() => Array.from(window.__seen)") if t.strip()]
            longest = max(seen, key=len)
            partial = [t for t in seen if len(t) < len(longest) and longest.startswith(t)]
            assert len(partial) >= 2, f"the reply did not grow in place (saw {len(seen)} renderings)"
            shot(page, "1-chat")
        except BaseException:
            shot(page, "1-chat-failed")
            raise
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.browser
def test_compare_and_runs_views_in_headless_chromium(ui_env):
    """Compare mode: one message to the base model and an adapter, both replies streamed side by side
    (each equal to the API's answer); the Runs view: a real loss plot from results.csv and the eval table."""
    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    url, base, _store, _tmp = ui_env
    api = client(url)
    question = "Where can I launch a kayak on the river?"

    def api_answer(model, max_tokens=12):
        msgs = [{"role": "system", "content": ALPHA_SYSTEM}, {"role": "user", "content": question}]
        r = api.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60000)
            login(page, url)
            page.get_by_role("tab", name="Compare").click()
            expect(page.locator("#compare-a input")).to_have_value(f"{base} (base model)")
            expect(page.locator("#compare-b input")).to_have_value("alpha (LATEST: v1)")
            # the shared system prompt defaults to alpha's (the base model has none)
            expect(page.locator("#compare-system textarea")).to_have_value(ALPHA_SYSTEM)
            page.get_by_text("Generation settings").click()
            # short replies: the two sides decode in one batch, and a long greedy reply of the 4-bit tiny model
            # can tip on a near-tie logit between batched and solo decoding (see the report)
            set_slider(page, "max_tokens", "12")
            set_slider(page, "temperature", "0")
            # record when each side's reply changes, to see both stream at the same time
            page.evaluate(
                """() => { window.__t = {a: [], b: []};
                for (const side of ['a', 'b']) {
                  const root = document.querySelector('#chat-' + side);
                  new MutationObserver(() => { const b = root.querySelectorAll('[data-testid=bot]');
                    if (b.length) window.__t[side].push([performance.now(), b[b.length - 1].innerText]); })
                  .observe(root, {subtree: true, childList: true, characterData: true}); } }"""
            )
            box = page.locator("#compare-input textarea")
            box.fill(question)
            box.press("Enter")
            bot_a, bot_b = page.locator("#chat-a [data-testid=bot]"), page.locator("#chat-b [data-testid=bot]")
            expect(bot_a.first).to_have_text(_norm(api_answer(base)), timeout=60000)
            expect(bot_b.first).to_have_text(_norm(api_answer("alpha")), timeout=60000)
            assert _norm(bot_a.first.inner_text()) != _norm(bot_b.first.inner_text())  # two models really answered
            t = page.evaluate("() => window.__t")
            a_times = [x[0] for x in t["a"] if x[1].strip()]
            b_times = [x[0] for x in t["b"] if x[1].strip()]
            assert len(a_times) >= 2 and len(b_times) >= 2, "both sides stream"
            # side by side: each side's first partial reply arrives before the other side's reply is done
            assert b_times[0] < a_times[-1] and a_times[0] < b_times[-1], (a_times, b_times)
            shot(page, "2-compare")

            page.get_by_role("tab", name="Runs").click()
            expect(page.locator("#run input")).to_have_value("run-alpha")
            expect(page.locator("#run-info")).to_contain_text("20 training and 4 validation loss points")
            expect(page.locator("#run-info")).to_contain_text("Published alpha@v1")
            # a real plot: Vega draws the two series (a canvas or an SVG with marks) in the LinePlot
            plot = page.locator("#loss-plot")
            expect(plot.locator("canvas, svg .mark-line").first).to_be_visible(timeout=30000)
            expect(plot).to_contain_text("series")
            expect(page.locator("#eval input")).to_have_value("alpha@v1")
            metrics = page.locator("#eval-metrics")
            expect(metrics).to_contain_text("perplexity")
            expect(metrics).to_contain_text("18.36")
            expect(metrics).to_contain_text("5.58")
            expect(page.locator("#eval-samples")).to_contain_text("The north slipway.")
            page.locator("#eval-samples").scroll_into_view_if_needed()
            shot(page, "3-runs")
        except BaseException:
            shot(page, "2-compare-failed")
            raise
        finally:
            browser.close()
