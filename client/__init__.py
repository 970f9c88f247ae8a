"""An async helper over Jina's gRPC `stream_doc`:

    async for doc in stream("what is the capital of France ?", max_tokens=20):
        print(doc.text, end="", flush=True)

It raises StreamError when the service ends a stream with an error (bad input, overload) or shuts down; its
`code` says which (schemas.ErrorCode). Cancelling the task that iterates it stops the generation on the server.
For that, `grpc_client()` makes grpc.aio forward every cancellation to its call (workarounds/grpc_cancel.py): a
process that drives Jina's Client itself should build it with `grpc_client()`. Importing this package patches
nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from docarray import BaseDoc
from jina import Client

from schemas import ModelOutputDocument, PromptDocument
from workarounds import grpc_aio_poller, grpc_cancel, jina_client

FAILURE_REASONS = {"error", "shutdown"}


class StreamError(RuntimeError):
    """The service ended a stream in failure: `finish_reason` ('error' or 'shutdown'), `code` (an ErrorCode value:
    invalid_request, overloaded, shutdown, unavailable, internal; None from a service without codes) and the
    `message` in words."""

    def __init__(self, finish_reason: str, message: str | None, code: str | None = None) -> None:
        super().__init__(f"{finish_reason}{f' ({code})' if code else ''}: {message or 'no detail given'}")
        self.finish_reason = finish_reason
        self.message = message
        self.code = code


async def stream(
    prompt: str | list[dict[str, str]],
    max_tokens: int = 128,
    host: str = "localhost",
    port: int = 12345,
    **options,
) -> AsyncIterator[ModelOutputDocument]:
    """Yield the service's documents as they arrive. `prompt`: a text, or a conversation ([{"role", "content"}]);
    `options` are PromptDocument's optional fields (stop, temperature, top_p, seed, chat_template, ...)."""
    conversation = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    request = PromptDocument(max_tokens=max_tokens, **conversation, **options)
    async for doc in stream_documents(grpc_client(host, port), request):
        if doc.finish_reason in FAILURE_REASONS:
            raise StreamError(doc.finish_reason, doc.error, doc.error_code)
        yield doc


def grpc_client(host: str = "localhost", port: int = 12345) -> Client:
    """Jina's async gRPC Client, in a process where cancelling a stream reaches the server (see above) and
    `stream_doc(..., metadata=...)` sends its metadata (an API key: workarounds/jina_client.py)."""
    grpc_cancel.install()
    jina_client.install()
    grpc_aio_poller.install()  # a client per stream must not restart grpc.aio's poller each time
    return Client(host=host, port=port, protocol="grpc", asyncio=True)


def stream_documents(client: Client, request: BaseDoc) -> AsyncIterator[ModelOutputDocument]:
    """Every document the service streams for `request` (a PromptDocument, or a document of another schema with
    its fields), as it arrives; failures come as a last document with finish_reason 'error', not raised."""
    return client.stream_doc(on="/stream", inputs=request, return_type=ModelOutputDocument)
