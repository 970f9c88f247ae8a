"""Cancel an executor's request when the task of Jina's worker that serves its gRPC call ends.

Jina's worker reads a streaming endpoint's async generator in the task of the gRPC call. When the call is cancelled
while the worker sends a document, the worker drops the generator at its `yield` without closing it: no
CancelledError, no GeneratorExit reaches the executor until a later garbage collection (seconds later, or never),
and the request runs on to max_tokens meanwhile. The end of that task is the one signal that comes at once.
Measured for the three fixes of lost cancellations together (this, grpc_cancel and the gateway's relay): before
them, 6 client tasks cancelled while the engine held 4 streams running and 2 waiting (tiny model) left streams
running on to max_tokens in 4 rounds of 16; after them, in none of 42 rounds.
tests/test_service.py cancels 4 streams the moment the engine runs them, 3 times over.

`install()` is also where the executor's process moves Jina's Prometheus endpoint to the metrics host
(workarounds/jina_monitoring.py): the executor calls it first thing, and nothing of the service runs there sooner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from workarounds import jina_monitoring
from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"jina": ("3.34",)}
TEST = "tests/test_service.py -k cancel"


def install() -> None:
    """Check, at the executor's start, that this jina is one the quirk was verified on (UnverifiedVersion if not),
    then move the process's Prometheus endpoint to the metrics host (loopback by default)."""
    require_verified(__name__, VERIFIED, TEST)
    jina_monitoring.install()


def cancel_when_task_ends(task: asyncio.Task, cancel: Callable[[], None]) -> Callable[[], None]:
    """Call `cancel()` when `task` (the worker's task reading the generator) ends, however it ends. Returns the
    function that takes the callback off again, for when the stream has ended normally. `cancel` must be safe to
    call late (the task may end long after the stream)."""

    def on_done(_task: asyncio.Task) -> None:
        cancel()

    def stop_watching() -> None:
        task.remove_done_callback(on_done)

    task.add_done_callback(on_done)
    return stop_watching
