"""The page at `/` in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright) on the embedded
model: a person types a prompt, watches the answer grow token by token, and can press Stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import Page

from harness.browser import page_at, wait_idle
from harness.service import FRANCE, Service, eventually, idle, stream_docs

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.fixture
async def page(embedded_service: Service, tmp_path: Path):
    async with page_at(embedded_service.url + "/", tmp_path / "page.png", height=700) as page:
        yield page


async def state(page: Page) -> str:
    return await page.evaluate("document.body.dataset.state || 'idle'")


async def observe_until_idle(page: Page) -> list[str]:
    """The answer's text each time it changed, until the page says the answer ended."""
    observations: list[str] = []
    for _ in range(6000):
        text = await page.text_content("#answer")
        running = await state(page) == "running"
        if running and (not observations or observations[-1] != text):
            observations.append(text)
        if not running and observations:
            final = await page.text_content("#answer")
            if observations[-1] != final:
                observations.append(final)
            return observations
        await asyncio.sleep(0.02)
    raise AssertionError("the answer never ended")


async def start_a_long_answer(page: Page, service: Service) -> float:
    """Ask for a 2000-token story on an idle service and wait until its text shows; returns the count of
    cancelled requests before it."""
    await idle(service)
    cancelled = service.cancelled_requests()
    await page.fill("#prompt", "Write a very long story about a dragon who learns to cook, with many chapters.")
    await page.fill("#max-tokens", "2000")
    await page.click("#send")
    await page.wait_for_function("() => document.getElementById('answer').textContent.length > 20", timeout=120_000)
    return cancelled


async def test_the_page_shows_the_answer_growing_token_by_token(page, embedded_service):
    await page.fill("#prompt", FRANCE)
    await page.click("#send")
    observations = await observe_until_idle(page)
    answers = [text for text in observations if text]
    assert len(answers) >= 3, f"the answer should grow over several observations, saw {observations}"
    assert all(a.startswith(b) and len(a) > len(b) for b, a in zip(answers, answers[1:]))
    assert "Paris" in answers[-1]
    assert "done" in await page.text_content("#status")
    # The page shows what the model says over gRPC, unchanged.
    docs = await stream_docs(embedded_service, prompt=FRANCE, max_tokens=256)
    assert answers[-1] == docs[-1].generated_text


async def test_stop_ends_a_long_answer(page, embedded_service):
    cancelled = await start_a_long_answer(page, embedded_service)
    assert await state(page) == "running" and await page.is_enabled("#stop")
    await page.click("#stop")
    await wait_idle(page)
    assert "stopped" in await page.text_content("#status")
    assert await page.is_disabled("#stop") and await page.is_enabled("#send")
    # The engine stopped the stream (finish_reason=cancelled), far short of 2000 tokens.
    await eventually(lambda: embedded_service.running_streams() == 0)
    assert embedded_service.cancelled_requests() == cancelled + 1
    stopped_text = await page.text_content("#answer")
    await asyncio.sleep(0.5)
    assert await page.text_content("#answer") == stopped_text

    # The page goes on working after a Stop.
    await page.fill("#prompt", FRANCE)
    await page.fill("#max-tokens", "64")
    await page.click("#send")
    assert "Paris" in (await observe_until_idle(page))[-1]


async def test_closing_the_page_cancels_the_generation(embedded_service, page):
    cancelled = await start_a_long_answer(page, embedded_service)
    await page.close()
    await eventually(lambda: embedded_service.running_streams() == 0)
    assert embedded_service.cancelled_requests() == cancelled + 1
