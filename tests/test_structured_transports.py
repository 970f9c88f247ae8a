"""Structured outputs on every transport of a real flow (the tiny random model: a valid answer is the
constraint's doing): gRPC, Jina's `/stream` SSE, `/generate`, the WebSocket and the predictions."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect

from harness.http import receive_until_end
from harness.predictions import eventually_async
from harness.service import Service, stream_docs
from schemas import ModelOutputDocument
from tests.test_structured import PERSON, assert_person

FIELDS = {"prompt": "Tell me about someone.", "max_tokens": 200}
BAD_REGEX = {"regex": "a(b"}


async def sse_documents(response: httpx.Response) -> list[ModelOutputDocument]:
    docs = []
    async for line in response.aiter_lines():
        if line.startswith("data:") and '"token_id"' in line:
            docs.append(ModelOutputDocument.parse_raw(line.removeprefix("data:").strip()))
    return docs


async def answer_on(service: Service, transport: str, fields: dict) -> tuple[str | None, str | None]:
    """(the answer's text, the error's message) of one request on `transport`; one of the two is None."""
    if transport == "grpc":
        docs = await stream_docs(service, **fields)
        return (None, docs[-1].error) if docs[-1].finish_reason == "error" else (docs[-1].generated_text, None)
    if transport == "websocket":
        async with connect(f"ws://127.0.0.1:{service.http_port}/ws") as ws:
            await ws.send(json.dumps({"type": "prompt", **fields}))
            last = (await receive_until_end(ws))[-1]
            return (last["text"], None) if last["type"] == "end" else (None, last["message"])
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        if transport == "stream":
            async with client.stream("GET", "/stream", json=fields) as response:
                if response.status_code != 200:
                    await response.aread()
                    return None, response.json()["error"]["message"]
                return (await sse_documents(response))[-1].generated_text, None
        if transport == "generate":
            response = await client.post("/generate", json={"data": [fields]})
            if response.status_code != 200:
                return None, response.json()["error"]["message"]
            (doc,) = response.json()["data"]
            return (None, doc["error"]) if doc["finish_reason"] == "error" else (doc["generated_text"], None)
        response = await client.post("/v1/predictions", json={"input": fields})
        if response.status_code >= 400:
            return None, response.json()["error"]["message"]
        url = f"/v1/predictions/{response.json()['id']}"
        prediction: dict = {}

        async def ended() -> bool:
            prediction.update((await client.get(url)).json())
            return prediction["status"] in ("succeeded", "failed", "canceled")

        await eventually_async(ended)
        return ("".join(prediction["output"]), None) if prediction["status"] == "succeeded" else (
            None, prediction["error"])


TRANSPORTS = ["grpc", "stream", "generate", "websocket", "predictions"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_json_schema_answer_validates_on_every_transport(tiny_service: Service, transport):
    # gRPC carries the schema as its text; the JSON transports take it as a JSON object too.
    schema = json.dumps(PERSON) if transport == "grpc" else PERSON
    text, error = await answer_on(tiny_service, transport, {**FIELDS, "json_schema": schema})
    assert error is None
    assert_person(text)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_constraint_that_does_not_compile_is_refused_naming_it_on_every_transport(
    tiny_service: Service, transport
):
    text, error = await answer_on(tiny_service, transport, {**FIELDS, **BAD_REGEX})
    assert text is None and error is not None
    assert "the regex does not compile" in error and "unclosed group" in error
    text, error = await answer_on(tiny_service, transport, {**FIELDS, "regex": "x+", "grammar": "start: /y+/"})
    assert error is not None and "send at most one of json_schema, regex and grammar" in error
