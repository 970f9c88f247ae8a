"""A seam in Jina's choice of the replica that serves a request, for prefix-affine routing (gateway/routing.py).

Jina's gateway picks a deployment's replica in `GrpcConnectionPool._send_single_doc_request`: it asks the
deployment's `_ReplicaList.get_next_connection()`, which hands out its `_connections` in turn (round robin), and
takes no hint from the caller. When a call fails with UNAVAILABLE, DEADLINE_EXCEEDED or NOT_FOUND (an unreachable
replica), Jina resets that connection and asks `get_next_connection()` again, in a loop that does not await
between the asks, until it gets an address it has not tried in this call or has tried as many as there are.

`install()` replaces `_ReplicaList.get_next_connection` with one that, while a chooser is set for the current
context, hands the chooser the addresses of the connections (those not being reset) and returns the one it names;
with none set, Jina's round robin, unchanged. `routed()` sets a chooser while each item of a stream is awaited, and
only then: never across a `yield`, so that the chooser cannot leak into whatever the consumer does meanwhile.

A chooser asked again within one call must name an address it has not named before while there is one: Jina's
retry loop would otherwise spin without awaiting, and the event loop would hang.
tests/test_routing.py proves it on a real flow and on a real executor beside an address nobody listens on.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from jina.serve.networking.replica_list import _ReplicaList

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"jina": ("3.34",)}
TEST = "tests/test_routing.py"

T = TypeVar("T")
# Given the addresses (`host:port`) of a deployment's replicas, the one to send to.
Chooser = Callable[[Sequence[str]], str]

_chooser: contextvars.ContextVar[Chooser | None] = contextvars.ContextVar("replica_chooser", default=None)
_round_robin = _ReplicaList.get_next_connection


async def _chosen_connection(self: _ReplicaList, num_retries: int = 3) -> Any:
    choose = _chooser.get()
    connections = [connection for connection in self._connections if connection is not None]
    if choose is None or not connections:  # none: every connection is being reset, and Jina waits for one
        return await _round_robin(self, num_retries=num_retries)
    address = choose([connection.address for connection in connections])
    return next(connection for connection in connections if connection.address == address)


def install() -> None:
    """Check that this jina is one the seam was verified on (UnverifiedVersion if not), then put it in place
    (once per process; without a chooser set it changes nothing)."""
    require_verified(__name__, VERIFIED, TEST)
    _ReplicaList.get_next_connection = _chosen_connection


async def routed(stream: AsyncGenerator[T, None], choose: Chooser) -> AsyncGenerator[T, None]:
    """The items of `stream` (a stream from Jina's gateway streamer), with `choose` picking the replica of every
    connection Jina asks for while one is awaited."""
    try:
        while True:
            token = _chooser.set(choose)
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                return
            finally:
                _chooser.reset(token)
            yield item
    finally:
        await stream.aclose()
