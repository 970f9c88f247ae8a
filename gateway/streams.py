"""One generation, consumed from the executor in its own task so that it can be cancelled.

Jina delivers asyncio.CancelledError into the executor's generator (which the engine turns into a cancellation)
only when the task consuming `stream_doc` is cancelled; leaving the loop alone does not. So every consumer here
reads documents from a queue filled by a pump task, and `close()` cancels that task.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from schemas import ModelOutputDocument, PromptDocument, error_document

STREAM_ENDPOINT = "/stream"
_END = object()


class DocStream:
    """Async iterator over the ModelOutputDocuments of one PromptDocument. Ends after the document with a
    finish_reason; a transport failure becomes a last document with finish_reason='error'."""

    def __init__(self, streamer: Any, prompt: PromptDocument) -> None:
        self._streamer = streamer
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(prompt))
        self._done = False

    async def _pump(self, prompt: PromptDocument) -> None:
        try:
            # No return_type: Jina then casts each document to the endpoint's output model (from the executor's
            # schema); with one it would fill the wrong class.
            async for doc, error in self._streamer.stream_doc(doc=prompt, exec_endpoint=STREAM_ENDPOINT):
                if error:
                    self._queue.put_nowait(error_document(f"the executor failed: {error}"))
                    return
                if not isinstance(doc, ModelOutputDocument):
                    doc = ModelOutputDocument.parse_obj(doc.dict())
                self._queue.put_nowait(doc)
                if doc.finish_reason is not None:
                    return
            self._queue.put_nowait(error_document("the stream ended without a last document"))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the executor is unreachable, the connection broke, ...
            self._queue.put_nowait(error_document(f"the stream failed: {error!r}"))
        finally:
            self._queue.put_nowait(_END)

    def __aiter__(self) -> "DocStream":
        return self

    async def __anext__(self) -> ModelOutputDocument:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if item.finish_reason is not None:
            self._done = True
        return item

    async def first(self) -> Optional[ModelOutputDocument]:
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    async def close(self) -> None:
        """Cancel the generation if it still runs (the executor's generator gets CancelledError)."""
        self._done = True
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> "DocStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
