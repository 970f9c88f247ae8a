"""Typed error codes: every failure document carries `error_code` (schemas.ErrorCode) beside the `error` text, and
the transports answer by the code, never by the text: over gRPC the document's code (and client.StreamError's),
over HTTP the status and OpenAI's error `code`, over the WebSocket the error message's `code`."""

from __future__ import annotations

import asyncio
import json
import operator

import httpx
import pytest
from docarray import BaseDoc
from websockets.asyncio.client import connect

import engine
from client import StreamError, stream
from executor import TokenStreamingExecutor
from gateway.openai_api import failure
from gateway.streams import DocStream
from harness.service import TINY_LIMITS, Service, eventually, grpc_client, stream_docs
from schemas import ErrorCode, ModelOutputDocument, PromptDocument

CHAT = "/v1/chat/completions"


def test_the_engine_codes_are_the_contract_codes():
    """The executor passes the engine's code on by value: a code the contract lacks would fail every such stream."""
    assert {code.value for code in engine.ErrorCode} == {code.value for code in ErrorCode}


@pytest.mark.parametrize(
    "code, status",
    [("invalid_request", 400), ("overloaded", 429), ("shutdown", 503), ("unavailable", 503), ("internal", 500)],
)
def test_each_code_has_its_http_status_whatever_the_text(code, status):
    doc = ModelOutputDocument(token_id=-1, generated_text="", finish_reason="error", error="words", error_code=code)
    error = failure(doc)
    assert (error.status, error.code, error.message) == (status, code, "words")


def test_a_failure_without_a_known_code_is_the_service_s_fault_and_a_shutdown_stays_a_shutdown():
    """An executor of another version (Kubernetes may roll the gateway and the executors apart) may send none."""
    for code in (None, "a-code-of-a-newer-executor"):
        error = ModelOutputDocument(token_id=-1, generated_text="", finish_reason="error", error_code=code)
        shutdown = ModelOutputDocument(token_id=-1, generated_text="", finish_reason="shutdown", error_code=code)
        assert (failure(error).status, failure(error).code) == (500, "internal")
        assert (failure(shutdown).status, failure(shutdown).code) == (503, "shutdown")


class UnreachableExecutor:
    """A gateway streamer whose executor cannot be reached, as Jina's raises it to the HTTP transports."""

    async def stream_doc(self, **kwargs):
        raise ConnectionError("failed to connect to all addresses")
        yield


async def test_an_unreachable_executor_is_unavailable_a_503():
    async with DocStream(UnreachableExecutor(), PromptDocument(prompt="hi", max_tokens=3)) as docs:
        (doc,) = [doc async for doc in docs]
    assert (doc.finish_reason, doc.error_code) == ("error", "unavailable")
    assert doc.error == "the engine is unavailable: retry later" and failure(doc).status == 503  # no address


# On the real flow (the tiny model, TINY_LIMITS: 4 running, 2 waiting) ------------------------------------------


async def test_bad_input_is_invalid_request_over_grpc(tiny_service):
    (doc,) = await stream_docs(tiny_service, prompt="hi", max_tokens=0)
    assert (doc.finish_reason, doc.error_code) == ("error", "invalid_request")
    with pytest.raises(StreamError) as raised:
        async for _ in stream("hi", max_tokens=0, host="127.0.0.1", port=tiny_service.grpc_port):
            pass
    assert raised.value.code == "invalid_request" and "max_tokens must be at least 1" in str(raised.value)


class MistypedPrompt(BaseDoc):  # another client's schema: max_tokens of the wrong type
    prompt: str
    max_tokens: str


async def test_a_document_the_gateway_refuses_is_invalid_request(tiny_service):
    docs = [
        doc
        async for doc in grpc_client(tiny_service.grpc_port).stream_doc(
            on="/stream", inputs=MistypedPrompt(prompt="hi", max_tokens="many"), return_type=ModelOutputDocument
        )
    ]
    assert [(doc.finish_reason, doc.error_code) for doc in docs] == [("error", "invalid_request")]
    assert "`max_tokens`" in docs[0].error


async def test_bad_input_is_a_400_invalid_request_over_http_and_the_websocket(tiny_service):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 100_000})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    async with connect(f"ws://127.0.0.1:{tiny_service.http_port}/ws") as websocket:
        await websocket.send('{"type": "prompt", "prompt": "hi", "max_tokens": 100000}')
        messages = []
        while not messages or messages[-1]["type"] not in ("end", "error"):
            messages.append(json.loads(await websocket.recv()))
    assert (messages[-1]["type"], messages[-1]["code"]) == ("error", "invalid_request")


async def fill_the_replica(service: Service) -> list[asyncio.Task]:
    """Long streams until every batch slot and queue place is taken; cancel the tasks to free them."""
    streams = [
        asyncio.create_task(stream_docs(service, prompt=f"busy {i}", max_tokens=4000, chat_template=False))
        for i in range(TINY_LIMITS["max_running"] + TINY_LIMITS["max_waiting"])
    ]
    await eventually(lambda: (service.running_streams(), service.waiting_streams()) == (4, 2))
    return streams


async def test_overload_is_overloaded_over_grpc_and_a_429_over_http(tiny_service):
    streams = await fill_the_replica(tiny_service)
    try:
        (refused,) = await stream_docs(tiny_service, prompt="one too many", max_tokens=5)
        assert (refused.finish_reason, refused.error_code) == ("error", "overloaded")
        async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
            for stream_it in (False, True):
                response = await client.post(CHAT, json={"messages": [{"role": "user", "content": "one more"}],
                                                         "max_tokens": 5, "stream": stream_it})
                assert response.status_code == 429, response.text
                error = response.json()["error"]
                assert (error["code"], error["type"]) == ("overloaded", "rate_limit_error")
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await eventually(lambda: tiny_service.running_streams() + tiny_service.waiting_streams() == 0)


def broken_prepare(*args, **kwargs):
    raise RuntimeError("a bug of our own")


async def broken_generate(*args, **kwargs):
    raise RuntimeError("a bug of our own")
    yield  # an async generator, as LLMEngine.generate


@pytest.mark.parametrize("method, broken", [("processor.prepare", broken_prepare), ("generate", broken_generate)])
async def test_an_unexpected_failure_in_the_executor_is_one_internal_error_document(
    tiny_model_dir, monkeypatch, method, broken
):
    """Never raised out of the streaming endpoint (Jina's gateway would replay the stream): one last document."""
    executor = TokenStreamingExecutor(model=str(tiny_model_dir), dtype="float32", warmup_tokens=0)
    try:
        owner, _, name = f"engine.{method}".rpartition(".")  # the engine, or its input processor
        monkeypatch.setattr(operator.attrgetter(owner)(executor), name, broken)
        docs = [doc async for doc in executor.stream(PromptDocument(prompt="hi", max_tokens=3))]
        assert [(doc.finish_reason, doc.error_code) for doc in docs] == [("error", "internal")]
        assert "a bug of our own" in docs[0].error
    finally:
        executor.close()
