"""Graceful SIGTERM for the service's Jina processes (the executor and the gateway).

Jina's runtime answers SIGTERM by tearing its server down at once: streams in flight are cut. `drain_on_sigterm`
puts a drain step in front of that teardown: the process first finishes (or ends cleanly) what it is serving,
then hands over to Jina's own handler, which stops the server and exits the process.

`jina flow` itself installs no SIGTERM handler: on SIGTERM the parent dies and its executor and gateway children
would go on serving as orphans, holding the ports. A child forked by Jina therefore asks the kernel for SIGTERM
when its parent dies (PR_SET_PDEATHSIG), so that SIGTERM to the `jina flow` process alone, as Kubernetes or
systemd send it, drains and stops the whole service.

Until then, while an executor is still being built (its model loading), SIGTERM could not stop it: Jina's handler
runs on the event loop that the constructor holds, so a slow model load would outlive the flow. `die_with_parent`
asks for SIGKILL instead for that time: there is nothing to drain yet.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from workarounds import asyncio_signals

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

T = TypeVar("T")


class OpenStreams:
    """Counts the streams a process is serving, so that a drain can wait until the last one has ended."""

    def __init__(self) -> None:
        self.count = 0

    async def track(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        self.count += 1
        try:
            async for item in stream:
                yield item
        finally:
            self.count -= 1

    async def wait_closed(self, timeout_s: float) -> None:
        """Return once no stream is open, or after `timeout_s`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)


def drain_on_sigterm(drain: Callable[[], Awaitable[None]]) -> bool:
    """Run `drain()` on the first SIGTERM, then Jina's own SIGTERM handling. Call it from an Executor's or a
    Gateway's __init__, which Jina runs on its runtime's event loop after installing its signal handlers.
    Returns False outside such a runtime, e.g. an Executor built in a test or a script (and changes nothing there
    but SIGTERM on the death of a parent that forked it).
    Finding Jina's handler reaches into asyncio (workarounds/asyncio_signals.py): UnverifiedVersion on a python
    or jina it was not verified on."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    asyncio_signals.install()
    # The constructor is about to hand the loop back: from here SIGTERM stops the process (die_with_parent's SIGKILL
    # is no longer needed), through the drain below, or else through Jina's handler or SIGTERM's default action.
    _signal_when_parent_dies(signal.SIGTERM)
    run_jina_handler = asyncio_signals.installed_handler(loop, signal.SIGTERM)
    if run_jina_handler is None:
        return False
    draining: list[asyncio.Task] = []  # holds the one drain task: a second SIGTERM must not start another

    async def drain_then_stop() -> None:
        try:
            await drain()
        except Exception:  # a failed drain must not keep the process alive
            log.exception("draining before shutdown failed")
        run_jina_handler()

    def on_sigterm() -> None:
        if not draining:
            draining.append(loop.create_task(drain_then_stop()))

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    return True


def die_with_parent() -> None:
    """Until drain_on_sigterm takes over: SIGKILL when the `jina flow` that forked this process dies. Call it first
    in an Executor's __init__, whose model may take minutes to load (or fail to)."""
    _signal_when_parent_dies(signal.SIGKILL)


def _signal_when_parent_dies(sig: signal.Signals) -> None:
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # not a child forked by `jina flow` (e.g. `jina executor` in a container): nothing to follow
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent.pid:  # the parent died before the request above took effect
        os.kill(os.getpid(), sig)
