"""The headless Chromium that the page's tests drive: Debian's build (Playwright's own browser download cannot work
offline), with the flags that keep it quiet and local."""

from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Page, async_playwright

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


@asynccontextmanager
async def page_at(url: str, screenshot: Path, height: int = 800, on_new_page: Callable[[Page], None] | None = None):
    """A Chromium page on `url` once its send button is enabled (the WebSocket is open); a screenshot of it is
    left at `screenshot` when the test is done, to look at when it failed. `on_new_page` runs before the page
    loads (to listen to its WebSocket, say)."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": height})
            if on_new_page is not None:
                on_new_page(page)
            await page.goto(url)
            await page.wait_for_selector("#send:not([disabled])")
            yield page
            if not page.is_closed():
                await page.screenshot(path=str(screenshot))
        finally:
            await browser.close()
