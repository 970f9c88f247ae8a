"""The headless Chromium that the page's tests drive: Debian's build (Playwright's own browser download cannot work
offline), with the flags that keep it quiet and local."""

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
