"""Forward every cancellation of a grpc.aio streaming call's reader to the call, so that the server learns of it.

grpc.aio (1.68, as pinned) loses one: a server-streaming call's first read first awaits the call's start (the
task that sends the request and waits for the server's initial metadata), and forwards a cancellation of the
reading task to the call only from the read after that. A task cancelled just as the call has started (the
server's first message has arrived, the reader has not resumed yet) leaves its call open: the server is never
told, and the stream runs on to max_tokens. Measured: 6 client tasks cancelled while the service held 4 streams
running and 2 waiting, none yet with a document: in 4 rounds of 16 the 4 running streams ran on (the gateway
relayed all 4000 tokens of each); with this module, 24 rounds of 24 freed every stream within 0.1 s.

It hits every process that reads Jina's gRPC streams and cancels: the client (Jina's Client, built by
client.grpc_client()) and the gateway, whose call to the executor's worker is cancelled when its client goes away.
Both install it; tests/test_grpc_cancel.py proves it on a real grpc.aio server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpc.aio import _call

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"grpcio": ("1.68",)}
TEST = "tests/test_grpc_cancel.py"

_read_after_start = _call._StreamResponseMixin._read


async def _read(self: _call._StreamResponseMixin):
    try:
        await self._preparation
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise
    return await _read_after_start(self)  # awaits the started call again (at once), then reads as before


def install() -> None:
    """Patch grpc.aio's streaming calls in this process; calling it again changes nothing. Raises
    UnverifiedVersion on a grpcio it was not verified against."""
    require_verified(__name__, VERIFIED, TEST)
    _call._StreamResponseMixin._read = _read


def installed() -> bool:
    """Whether this process's grpc.aio streaming calls forward every cancellation (install() has run)."""
    return _call._StreamResponseMixin._read is _read


def when_started(call: Any, callback: Callable[[], None]) -> None:
    """Run `callback` as soon as a grpc.aio streaming call has started, before a reader waiting for that start
    resumes: the window this module closes, made certain for its test."""
    call._preparation.add_done_callback(lambda _: callback())
