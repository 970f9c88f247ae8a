"""Run the signal handler Jina installed on its runtime's event loop after a step of our own (lifecycle/).

Jina's runtime (AsyncNewLoopRuntime) installs its SIGTERM handler with `loop.add_signal_handler` before it builds
the Executor or Gateway, and that handler tears the server down at once: streams in flight are cut. To drain
first, lifecycle replaces it with its own and must still run Jina's afterwards. asyncio has no public getter for
an installed handler: it keeps them in the loop's `_signal_handlers` (a dict of asyncio.Handle), and a Handle runs
its callback through `_run()`. Measured: an executor started by `jina flow` or by `jina executor` runs asyncio's
own selector loop, although uvloop is installed (whose loop has no `_signal_handlers`: there the handler cannot
be found, and a warning says that SIGTERM will not drain); tests/test_lifecycle.py drains a real flow's executor
and gateway on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"python": ("3.11",), "jina": ("3.34",)}
TEST = "tests/test_lifecycle.py"

log = logging.getLogger(__name__)


def install() -> None:
    """Check that this python and jina are ones the handler lookup was verified on (UnverifiedVersion if not)."""
    require_verified(__name__, VERIFIED, TEST)


def installed_handler(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> Callable[[], None] | None:
    """A function that runs the handler installed for `sig` on `loop` as asyncio would, or None when there is
    none (a loop outside a Jina runtime, or one that is not asyncio's own)."""
    handlers: dict[int, asyncio.Handle] | None = getattr(loop, "_signal_handlers", None)
    if handlers is None:
        log.warning(f"{type(loop).__name__} keeps its signal handlers where asyncio does not: no drain on {sig.name}")
        return None
    handle = handlers.get(sig)
    return None if handle is None else handle._run
