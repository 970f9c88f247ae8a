"""gateway/relay.py without a flow: the stream to the executor is cancelled however its consumer goes away, and
read no further ahead than READ_AHEAD. The real flow's side of it is tests/test_service.py (cancellation)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.relay import READ_AHEAD, TaskRelay, relayed
from harness.service import eventually


class CallContext:
    """The part of grpc.aio's ServicerContext that `relayed` uses: callbacks run when the call terminates."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def terminate(self) -> None:
        for callback in self.callbacks:
            callback(self)


class ExecutorStream:
    """Stands for Jina's stream to the executor: counts the items pulled, and whether it was cancelled."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.pulled = 0
        self.cancelled = False
        self.fail_after = fail_after

    async def __call__(self, request: Any = None, context: Any = None) -> AsyncIterator[int]:
        try:
            for index in itertools.count():
                if index == self.fail_after:
                    raise ConnectionError("the executor went away")
                self.pulled += 1
                yield index
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_the_end_of_the_call_cancels_the_stream_while_the_handler_is_left_at_a_yield():
    """grpc.aio ends a call whose client cancelled while the handler's document was being sent by leaving the
    handler at its `yield`, closed only at a later garbage collection."""
    stream, context = ExecutorStream(), CallContext()
    handler = relayed(stream)(None, context)
    assert await anext(handler) == 0
    context.terminate()
    await eventually(lambda: stream.cancelled)
    assert [item async for item in handler] == []  # and the handler ends, if anything still reads it


async def test_cancelling_the_consumer_cancels_the_stream():
    stream = ExecutorStream()

    async def consume() -> None:
        async for _ in relayed(stream)(None, CallContext()):
            pass

    consumer = asyncio.create_task(consume())
    await eventually(lambda: stream.pulled > 3)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    assert stream.cancelled


async def test_closing_the_relay_cancels_the_stream():
    stream = ExecutorStream()
    relay = TaskRelay(stream())
    assert await anext(relay) == 0
    await relay.close()
    assert stream.cancelled
    with pytest.raises(StopAsyncIteration):
        await anext(relay)


async def test_a_failure_of_the_stream_reaches_the_consumer_after_the_items_before_it():
    relay = TaskRelay(ExecutorStream(fail_after=3)())
    received = []
    with pytest.raises(ConnectionError, match="the executor went away"):
        async for item in relay:
            received.append(item)
    assert received == [0, 1, 2]


async def test_a_consumer_that_stops_reading_holds_the_stream_back():
    stream = ExecutorStream()
    relay = TaskRelay(stream())
    assert await anext(relay) == 0
    await asyncio.sleep(0.3)  # hundreds of items' time
    assert stream.pulled <= READ_AHEAD + 2  # the one read, the queue full, one waiting to be put
    await relay.close()
