"""Keep grpc.aio's completion-queue poller running for the life of the process.

grpc.aio (1.68, as pinned) starts its poller (a thread that hands the completion queue's events to the event loop)
when a process creates its first channel or server, and shuts it down when the last one is destroyed: a reference
count. A process that opens a channel per stream and closes it (Jina's Client does, for every `stream_doc`) stops
and restarts the poller over and over, and those restarts race: grpc/grpc#22758 made the shutdown stricter after
"a previous poller thread wasn't joined and a new poller thread became alive" under pytest, and #22365 still reports
hangs, with grpc's advice: one `init_grpc_aio()` of its own, early, so that the count never returns to zero.

Measured here: in 4 of the 6 full test runs that reached it (CI's included), the test process, after thousands
of client streams, never received the end of one stream that the gateway had finished and logged (the last of 16
in tests/test_lifecycle.py's replicas test), and waited forever; run alone, or after a few modules, that test
passed every time. With the poller held for the whole process, the full runs since (two fresh clones included)
passed it and every test after it.
"""

from __future__ import annotations

from grpc.experimental import aio

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"grpcio": ("1.68",)}
TEST = "tests/test_lifecycle.py (in the whole suite: make test)"

_held = False


def install() -> None:
    """Hold one reference to grpc.aio's poller for the rest of the process; calling it again changes nothing.
    Raises UnverifiedVersion on a grpcio it was not verified against."""
    global _held
    require_verified(__name__, VERIFIED, TEST)
    if not _held:
        aio.init_grpc_aio()
        _held = True
