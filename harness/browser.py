"""The headless Chromium that the page's tests drive: Debian's build (Playwright's own browser download cannot work
offline), with the flags that keep it quiet and local."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READY = "#send:not([disabled])"  # the page's WebSocket is open
# wait_for_function's predicates are written as functions: Playwright evaluates a bare expression with eval, which
# the page's Content-Security-Policy (no 'unsafe-eval') refuses.
IDLE = "() => document.body.dataset.state === 'idle'"


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def page_at(
    url: str,
    screenshot: Path,
    height: int = 800,
    on_new_page: Callable[[Page], None] | None = None,
    ready: str = READY,
) -> AsyncIterator[Page]:
    """A Chromium page on `url` once `ready` (a selector) shows, by default once its send button is enabled; a
    screenshot of it is left at `screenshot` when the test is done, to look at when it failed. `on_new_page` runs
    before the page loads (to listen to its WebSocket, say)."""
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1000, "height": height})  # more tabs: page.context
        page = await context.new_page()
        if on_new_page is not None:
            on_new_page(page)
        await page.goto(url)
        await page.wait_for_selector(ready)
        try:
            yield page
        finally:  # also when the test failed: that is when the screenshot is looked at
            if not page.is_closed():
                await page.screenshot(path=str(screenshot))


async def wait_idle(page: Page) -> None:
    """Until the page says its answer ended."""
    await page.wait_for_function(IDLE, timeout=60_000)
