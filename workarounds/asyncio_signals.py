"""Run the signal handler Jina installed on its runtime's event loop after a step of our own (lifecycle/).

Jina's runtime (AsyncNewLoopRuntime) installs its SIGTERM handler with `loop.add_signal_handler` before it builds
the Executor or Gateway, and that handler tears the server down at once: streams in flight are cut. To drain
first, lifecycle replaces it with its own and must still run Jina's afterwards. asyncio has no public getter for
an installed handler: it keeps them in the loop's `_signal_handlers` (a dict of asyncio.Handle), and a Handle runs
its callback through `_run()`. Measured: Jina's executor and gateway processes run asyncio's own selector loop
(not uvloop, whose loop has no `_signal_handlers`); tests/test_lifecycle.py drains a real flow on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"python": ("3.11",), "jina": ("3.34",)}
TEST = "tests/test_lifecycle.py"


def install() -> None:
    """Check that this python and jina are ones the handler lookup was verified on (UnverifiedVersion if not)."""
    require_verified(__name__, VERIFIED, TEST)


def installed_handler(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> Callable[[], None] | None:
    """A function that runs the handler installed for `sig` on `loop` as asyncio would, or None when there is
    none (a loop outside a Jina runtime, or not asyncio's own)."""
    handle: asyncio.Handle | None = getattr(loop, "_signal_handlers", {}).get(sig)
    if handle is None:
        return None
    return handle._run
