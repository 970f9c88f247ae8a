"""Attacks on a real flow of the tiny model (issue 25): each gets its clear 4xx, or the service recovers.

Values a document cannot carry to the executor (gateway/encodable.py) on every transport; bounded request reading
(gateway/limits.py); predictions' edges."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from harness.http import CHAT, COMPLETIONS, receive_until_end
from harness.service import TINY_LIMITS, Service, serve, stream_docs

SURROGATE = "\ud800"  # valid JSON ("\\ud800"), not encodable as UTF-8
BEYOND_INT64 = 2**63  # and far beyond the int32 a document's whole numbers travel as
NAN, INFINITY = math.nan, math.inf

# The field at fault (as it appears in the error) -> the PromptDocument fields that carry the bad value.
CASES: dict[str, dict[str, Any]] = {
    "prompt": {"prompt": SURROGATE},
    "stop": {"stop": ["ok", SURROGATE]},
    "content": {"prompt": None, "messages": [{"role": "user", "content": "hi " + SURROGATE}]},
    "seed": {"seed": BEYOND_INT64},
    "max_tokens": {"max_tokens": BEYOND_INT64},
    "temperature": {"temperature": NAN},
    "top_p": {"top_p": INFINITY},
    "logit_bias": {"logit_bias": {"1": -INFINITY}},
}
FLOAT_CASES = ("temperature", "top_p", "logit_bias")  # what protobuf itself can carry: NaN, Infinity


def document(case: str) -> dict[str, Any]:
    fields = {"prompt": "hi", "max_tokens": 4, **CASES[case]}
    return {name: value for name, value in fields.items() if value is not None}


def openai_body(case: str, chat: bool) -> dict[str, Any] | None:
    """The case as an OpenAI request; None where the API has no such field (a chat has no prompt)."""
    fields = document(case)
    prompt = fields.pop("prompt", None)
    messages = fields.pop("messages", None)
    if chat:
        if case == "prompt":
            return None
        fields["messages"] = messages or [{"role": "user", "content": "hi"}]
    else:
        if case == "content":
            return None
        fields["prompt"] = prompt
    return {"model": "test-model", **fields}


def assert_refused(status: int, error: dict[str, Any], field: str) -> None:
    assert status == 400, (status, error)
    assert field in error["message"], error
    assert error["code"] != "unavailable"


async def http_error(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    body = response.json()
    return response.status_code, body["error"]


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_value_the_document_cannot_carry_is_a_400_naming_it_on_every_transport(tiny_service: Service, case):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        for path, chat in ((CHAT, True), (COMPLETIONS, False)):
            body = openai_body(case, chat)
            if body is not None:
                for stream in (False, True):
                    response = await client.post(path, content=json.dumps({**body, "stream": stream}),
                                                 headers={"Content-Type": "application/json"})
                    assert_refused(*await http_error(response), case)
        for name, path, body in (
            ("stream", "/stream", document(case)),
            ("generate", "/generate", {"data": [document(case)]}),
            ("predictions", "/v1/predictions", {"input": document(case)}),
        ):
            method = "GET" if name == "stream" else "POST"
            response = await client.request(method, path, content=json.dumps(body),
                                            headers={"Content-Type": "application/json"})
            assert_refused(*await http_error(response), case)
            if name == "predictions":
                assert response.json()["detail"].startswith("input.")
    async with connect(f"ws://127.0.0.1:{tiny_service.http_port}/ws") as ws:
        await ws.send(json.dumps({"type": "prompt", **document(case)}))
        (message,) = await receive_until_end(ws)
        assert message["type"] == "error" and message["code"] == "invalid_request", message
        assert case in message["message"]
    if case in FLOAT_CASES:  # gRPC: the rest cannot even be encoded by a client (protobuf refuses them)
        (doc,) = await stream_docs(tiny_service, **document(case))
        assert doc.finish_reason == "error" and doc.error_code == "invalid_request", doc
        assert case in doc.error
    # The service goes on serving.
    docs = await stream_docs(tiny_service, prompt="hello", max_tokens=3)
    assert docs[-1].finish_reason in ("length", "eos")


# Bounded request reading (gateway/limits.py, workarounds/uvicorn_protocols.py) ------------------------------------

# Small bounds, so that a test reaches each in a second or two (the defaults are in gateway/limits.py).
BOUNDS = {"body_timeout_s": 1, "min_body_rate": 100, "max_header_count": 20, "max_header_bytes": 4096}


@pytest.fixture(scope="module")
def bounded_service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS}
    with serve(tmp_path_factory, "bounded-flow", uses_with, gateway_settings=BOUNDS) as service:
        yield service


def head(path: str, length: int | None = None, extra: list[str] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer_then_close(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """The response's status and JSON body, once the server has closed the connection (60 s at most)."""
    raw = await asyncio.wait_for(reader.read(), 60)  # to EOF: the server closes after its answer
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


async def opened(service: Service) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", service.http_port)


async def test_a_body_trickled_below_the_minimum_rate_gets_408_and_the_connection_closes(bounded_service):
    reader, writer = await opened(bounded_service)
    writer.write(head(COMPLETIONS, 100_000))

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:  # 5 bytes a second, each pause well within body_timeout_s
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        status, body = await answer_then_close(reader)
    finally:
        trickling.cancel()
        writer.close()
    assert status == 408
    assert "min_body_rate" in body["error"]["message"] and "100 bytes/s" in body["error"]["message"]


async def test_a_body_that_stops_gets_408_naming_the_timeout(bounded_service):
    reader, writer = await opened(bounded_service)
    writer.write(head(COMPLETIONS, 1000) + b'{"prompt": ')
    status, body = await answer_then_close(reader)
    writer.close()
    assert status == 408 and "1 s (body_timeout_s)" in body["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "limit"),
    [
        ([f"X-Header-{n}: {n}" for n in range(21)], "limit of 20 (max_header_count)"),
        ([f"X-Large: {'a' * 5000}"], "limit of 4096 bytes (max_header_bytes)"),
        ([f"X-Header-{n}: {n}" for n in range(10_000)], "limit of 20 (max_header_count)"),  # the 119 KB
    ],
)
async def test_too_many_or_too_large_headers_get_431_naming_the_limit(bounded_service, extra, limit):
    reader, writer = await opened(bounded_service)
    writer.write(head(COMPLETIONS, 2, extra) + b"{}")
    status, body = await answer_then_close(reader)
    writer.close()
    assert status == 431 and limit in body["error"]["message"]


async def test_a_body_sent_in_pieces_within_the_bounds_is_served_on_a_kept_alive_connection(bounded_service):
    request = json.dumps({"model": "test-model", "prompt": "hello", "max_tokens": 2}).encode()
    reader, writer = await opened(bounded_service)
    try:
        for _ in range(2):  # a second request on the same connection: its head and body are bounded afresh
            writer.write(head(COMPLETIONS, len(request)))
            for piece in (request[:10], request[10:30], request[30:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.3)
            status_line = await asyncio.wait_for(reader.readline(), 60)
            assert status_line.split()[1] == b"200", status_line
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(await reader.readexactly(length))["choices"]
    finally:
        writer.close()


# Predictions' edges ------------------------------------------------------------------------------------------------


async def test_prediction_edges_resume_checks_cancel_after_the_end_and_output_matching_its_count(tiny_service):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        created = await client.post("/v1/predictions", json={"input": {"prompt": "hello", "max_tokens": 24}})
        assert created.status_code == 201, created.text
        url = created.json()["urls"]["get"]
        final = (await client.get(url)).json()
        while final["status"] in ("starting", "processing"):
            await client.get(url, params={"wait": 30, "offset": len(final["output"]) + 1})
            final = (await client.get(url)).json()
        assert final["status"] == "succeeded"
        assert len(final["output"]) == final["metrics"]["output_token_count"] == 24
        # A cancel after the end answers with the prediction's true final state.
        cancelled = await client.post(created.json()["urls"]["cancel"])
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "succeeded"
        for value in ("-1", "9" * 30):
            for response in (
                await client.get(created.json()["urls"]["stream"], headers={"Last-Event-ID": value}),
                await client.get(created.json()["urls"]["stream"], params={"offset": value}),
            ):
                assert response.status_code == 400 and "between 0 and" in response.json()["detail"], response.text


async def test_a_websocket_outlives_the_body_timeout(bounded_service):
    """The upgrade request is the connection's last HTTP request: the socket is then the WebSocket's, whose idle
    pauses between turns are not a slow body (h11 reads the upgrade as a body under way that never ends)."""
    async with connect(f"ws://127.0.0.1:{bounded_service.http_port}/ws") as ws:
        for turn in range(2):
            await asyncio.sleep(2 * BOUNDS["body_timeout_s"])
            await ws.send(json.dumps({"type": "prompt", "prompt": f"turn {turn}", "max_tokens": 3}))
            assert (await receive_until_end(ws))[-1]["type"] == "end"
