"""One generation, consumed from the executor in its own task so that it can be cancelled.

Jina delivers asyncio.CancelledError into the executor's generator (which the engine turns into a cancellation)
only when the task consuming `stream_doc` is cancelled; leaving the loop alone does not (gateway/relay.py). So
the documents come through a TaskRelay, and `close()` cancels its task.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from gateway.relay import TaskRelay
from schemas import ErrorCode, ModelOutputDocument, PromptDocument, error_document

STREAM_ENDPOINT = "/stream"
# What a client is told when the executor cannot be reached or fails: never the error itself, which names internal
# addresses or holds a traceback (it goes to the log, with the document's id, which the client is told).
UNAVAILABLE_MESSAGE = "the engine is unavailable: retry later"

log = logging.getLogger(__name__)


class DocStream:
    """Async iterator over the ModelOutputDocuments of one PromptDocument. Ends after the document with a
    finish_reason; a transport failure becomes a last document with finish_reason='error'."""

    def __init__(self, streamer: Any, prompt: PromptDocument) -> None:
        self._relay = TaskRelay(documents(streamer, prompt))
        self._done = False

    def __aiter__(self) -> DocStream:
        return self

    async def __anext__(self) -> ModelOutputDocument:
        if self._done:
            raise StopAsyncIteration
        doc = await self._relay.__anext__()
        if doc.finish_reason is not None:
            self._done = True
        return doc

    async def first(self) -> ModelOutputDocument | None:
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    async def close(self) -> None:
        """Cancel the generation if it still runs (the executor's generator gets CancelledError)."""
        self._done = True
        await self._relay.close()

    async def __aenter__(self) -> DocStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def documents(streamer: Any, prompt: PromptDocument) -> AsyncIterator[ModelOutputDocument]:
    """The executor's documents up to the one with a finish_reason; every failure on the way a last error one."""
    try:
        # No return_type: Jina then casts each document to the endpoint's output model (from the executor's
        # schema); with one it would fill the wrong class.
        async for doc, error in streamer.stream_doc(doc=prompt, exec_endpoint=STREAM_ENDPOINT):
            if error:  # the executor raised: it never should (executor/executor.py)
                log.error(f"request {prompt.id}: the executor failed: {error}")
                message = f"the executor failed (request {prompt.id}: the gateway's log has the details)"
                yield error_document(message, ErrorCode.INTERNAL)
                return
            if not isinstance(doc, ModelOutputDocument):
                doc = ModelOutputDocument.parse_obj(doc.dict())
            yield doc
            if doc.finish_reason is not None:
                return
    except Exception as error:  # the executor is unreachable, the connection broke, ...
        log.warning(f"request {prompt.id}: the stream to the executor failed: {error!r}")
        yield error_document(UNAVAILABLE_MESSAGE, ErrorCode.UNAVAILABLE)
        return
    yield error_document("the stream ended without a last document", ErrorCode.UNAVAILABLE)
