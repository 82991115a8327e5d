"""The Gradio chat UI at /ui: its login (an API key as password), ACA Easy Auth headers, and a real
chat driven in headless Chromium (Debian's package, driven by Playwright; never `playwright install`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import KEY, client, live_server, publish

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
    publish(store, "alpha", tiny_llama, tmp, seed=1)
    publish(store, "beta", tiny_llama, tmp, seed=2)
    with live_server(create_app(store, str(tiny_llama), [KEY])) as url:
        yield url, str(tiny_llama), store, tmp


@pytest.mark.slow
def test_ui_needs_login_with_an_api_key(ui_env):
    import httpx

    url = ui_env[0]
    assert httpx.get(f"{url}/ui/config").status_code == 401
    with httpx.Client(base_url=url) as c:
        bad = c.post("/ui/login", data={"username": "me", "password": "wrong"})
        assert bad.status_code >= 400
        assert c.get("/ui/config").status_code == 401
        ok = c.post("/ui/login", data={"username": "me", "password": KEY})
        assert ok.status_code == 200
        assert c.get("/ui/config").status_code == 200
        # the UI login does not open the API: /v1 still wants the Bearer key
        assert c.get("/v1/models").status_code == 401


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
    box.fill(value)
    box.press("Tab")  # commit (change event)
    expect(page.locator(f"#{elem_id} input[type=range]")).to_have_value(value)


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
@pytest.mark.browser
def test_chat_in_headless_chromium(ui_env):
    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    url, base, _store, _tmp = ui_env
    api = client(url)
    system = "Be brief."
    q1, q2 = "What is the weather like by the river today?", "And tomorrow?"

    def api_answer(messages):
        r = api.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
        return r.choices[0].message.content

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60000)
            page.goto(f"{url}/ui/")
            page.get_by_label("username").fill("tester")
            page.get_by_label("password").fill(KEY)
            page.get_by_role("button", name="Login").click()

            # the adapter dropdown is filled from the store
            page.locator("#adapter input").click()
            options = page.get_by_role("option")
            expect(options).to_have_count(3)
            assert {t.strip(" ✓\n") for t in options.all_inner_texts()} == {base, "alpha", "beta"}
            page.get_by_role("option", name="alpha").click()
            page.locator("#system textarea").fill(system)
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
        finally:
            browser.close()
