"""Relay a stream from the executor through a task of its own, so that a client going away cancels it.

The gateway's stream to the executor is a chain of Jina's async generators, down to the gRPC call to the
executor's worker. Cancelling the task that awaits the chain cancels that call, and Jina's worker then delivers
asyncio.CancelledError into the executor's generator, which cancels the request in the engine. Leaving an
`async for` over the chain any other way does not: a `break`, or a GeneratorExit thrown in at a `yield` (gRPC's
server closes a handler that way when the client cancels while a document is being sent to it) only drops the
chain, which cancels its call at a later garbage collection, seconds later or never. Measured on gRPC
`stream_doc` with 6 client-cancelled streams a round: in 5 rounds of 10, handlers closed that way left their
streams running on to max_tokens.

So the stream is read by a pump task, and every way the consumer can end (the end of the stream, an exception,
cancellation, GeneratorExit, the gRPC call terminating) cancels that task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from workarounds.jina_gateway import StreamDocRequest

T = TypeVar("T")

StreamDocHandler = Callable[[StreamDocRequest, Any], AsyncIterator[StreamDocRequest]]

# Documents the pump may read ahead of a slow consumer: enough to keep it reading while a document is being
# sent, few enough that a client that stops reading holds the executor's stream back (gRPC flow control).
READ_AHEAD = 16


class _End:
    pass


class _Raised:
    def __init__(self, error: Exception) -> None:
        self.error = error


class TaskRelay(Generic[T]):
    """Async iterator over `source`'s items, which a task of its own reads; `cancel()`/`close()` cancel it.
    An exception `source` raises is raised to the consumer after the items before it."""

    def __init__(self, source: AsyncIterator[T]) -> None:
        self._queue: asyncio.Queue[T | _End | _Raised] = asyncio.Queue(READ_AHEAD)
        self._task = asyncio.create_task(self._pump(source))
        self._ended = False

    async def _pump(self, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await self._queue.put(item)
        except Exception as error:  # not CancelledError: a cancelled pump has no consumer left to tell
            await self._queue.put(_Raised(error))
        else:
            await self._queue.put(_End())

    def __aiter__(self) -> TaskRelay[T]:
        return self

    async def __anext__(self) -> T:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _End):
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, _Raised):
            self._ended = True
            raise item.error
        return item

    def cancel(self) -> None:
        """Cancel the pump; a consumer waiting for the next item gets the end of the iteration."""
        self._task.cancel()
        while not self._queue.empty():  # room for the end, which must not wait for a consumer that is gone
            self._queue.get_nowait()
        self._queue.put_nowait(_End())

    async def close(self) -> None:
        """Cancel the pump if it still runs, and wait until it has stopped."""
        self.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def relayed(stream_doc: StreamDocHandler) -> StreamDocHandler:
    """Wrap the gRPC request handler's `stream_doc` so that the stream to the executor is cancelled as soon as the
    client's gRPC call ends, however it ends."""

    async def relayed_stream_doc(request: StreamDocRequest, context: Any) -> AsyncIterator[StreamDocRequest]:
        relay = TaskRelay(stream_doc(request, context))
        if context is not None:
            # Runs when the call terminates, also when gRPC leaves this generator suspended at its `yield`.
            loop = asyncio.get_running_loop()
            context.add_done_callback(lambda _: loop.call_soon_threadsafe(relay.cancel))
        try:
            async for response in relay:
                yield response
        finally:
            await relay.close()

    return relayed_stream_doc
