"""gateway/validation.py without a flow: what the gRPC `stream_doc` wrapper answers, passes on, and cancels.
The real flow's side of it is tests/test_resilience.py (documents of another schema)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from docarray import BaseDoc
from jina.types.request.data import SingleDocumentRequest

from gateway.streams import STREAM_ENDPOINT
from gateway.validation import prompt_error, validating
from schemas import ModelOutputDocument, PromptDocument


class PromptOnly(BaseDoc):
    prompt: str


class NestedPrompt(BaseDoc):
    prompt: PromptOnly  # a field from_protobuf cannot turn into a str at all
    max_tokens: int


class WithExtras(BaseDoc):
    prompt: str
    max_tokens: int
    user: str = "someone"


def received(doc: BaseDoc, endpoint: str = STREAM_ENDPOINT) -> SingleDocumentRequest:
    """The request as the gateway's gRPC server gets it: bytes on the wire, without the client's document class."""
    request = SingleDocumentRequest()
    request.header.exec_endpoint = endpoint
    request.document_cls = type(doc)
    request.data.doc = doc
    return SingleDocumentRequest(request.proto.SerializeToString())


def documents(responses: list[SingleDocumentRequest]) -> list[ModelOutputDocument]:
    return [ModelOutputDocument.from_protobuf(response.proto.document) for response in responses]


def test_prompt_error_names_the_field_and_what_is_expected():
    assert prompt_error(received(PromptDocument(prompt="hi", max_tokens=3))) is None
    assert prompt_error(received(WithExtras(prompt="hi", max_tokens=3))) is None
    assert "`max_tokens` is missing (required, of type int)" in prompt_error(received(PromptOnly(prompt="hi")))
    nested = NestedPrompt(prompt=PromptOnly(prompt="x"), max_tokens=1)
    assert "cannot be read as a PromptDocument" in prompt_error(received(nested))


async def test_an_invalid_document_gets_one_error_document_and_never_reaches_the_handler():
    calls = []

    async def handler(request, context) -> AsyncIterator[SingleDocumentRequest]:
        calls.append(request)
        yield request

    responses = [r async for r in validating(handler)(received(PromptOnly(prompt="hi")), None)]
    [doc] = documents(responses)
    assert doc.finish_reason == "error" and "`max_tokens`" in doc.error and not calls


async def test_valid_documents_and_other_endpoints_go_to_the_handler_unchanged():
    async def handler(request, context) -> AsyncIterator[SingleDocumentRequest]:
        yield request
        yield request

    for request in (received(WithExtras(prompt="hi", max_tokens=3)), received(PromptOnly(prompt="hi"), "/other")):
        assert [r async for r in validating(handler)(request, "context")] == [request, request]


async def test_cancelling_the_call_cancels_the_handler_generator():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request, context) -> AsyncIterator[SingleDocumentRequest]:
        try:
            started.set()
            await asyncio.sleep(60)
            yield request
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def consume() -> None:
        async for _ in validating(handler)(received(PromptDocument(prompt="hi", max_tokens=3)), None):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert cancelled.is_set()
