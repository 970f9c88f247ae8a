"""Operations on a real flow of the tiny model: the gateway's access log (a line per request on every protocol,
the request id honoured and echoed) and the executor's Prometheus metrics (the model label, the batch-size and
KV-cache gauges, the prompt- and generation-length histograms)."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from jina.proto import jina_pb2
from jina.types.request.data import SingleDocumentRequest
from websockets.asyncio.client import connect

from gateway.access_log import MAX_REQUEST_ID_LENGTH, REQUEST_ID_HEADER, request_id
from harness.http import CHAT, COMPLETIONS, USER, receive_until_end
from harness.service import TINY_LIMITS, Service, documents, eventually, grpc_client, idle, serve, stream_docs
from schemas import ModelOutputDocument, PromptDocument

LONG = 4000  # max_tokens of a stream still running while the test looks at it (the tiny model: ~ms a token)


class KnownDirectory:
    """What `serve` takes as tmp_path_factory, making the flow's directory (and so its log) where the test knows."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("operations")


@pytest.fixture(scope="module")
def service(flow_dir, tiny_model_dir) -> Iterator[Service]:
    with serve(KnownDirectory(flow_dir), "flow", {"model": str(tiny_model_dir), **TINY_LIMITS}) as service:
        yield service


def access_lines(flow_dir: Path) -> list[dict[str, str]]:
    """The access log's lines in the flow's log, as their key=value fields (JSON-quoted values unquoted)."""
    lines = []
    for line in (flow_dir / "flow" / "flow.log").read_text(errors="replace").splitlines():
        if " llm.access " in line:
            fields = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line.split(" llm.access ", 1)[1])
            lines.append({key: json.loads(value) if value.startswith('"') else value for key, value in fields})
    return lines


async def access_line(flow_dir: Path, request_id: str) -> dict[str, str]:
    """The line of `request_id`, once the gateway's log thread has written it."""
    await eventually(lambda: any(line["request_id"] == request_id for line in access_lines(flow_dir)))
    [line] = [line for line in access_lines(flow_dir) if line["request_id"] == request_id]
    return line


def assert_timed(line: dict[str, str], first_token: bool = True) -> None:
    """The line's timings are durations a reader can use (no claim on speed): numbers, not negative, and the first
    token's time within the request's."""
    assert float(line["duration_ms"]) >= 0
    if first_token:
        assert 0 <= float(line["ttft_ms"]) <= float(line["duration_ms"])


# The access log ------------------------------------------------------------------------------------------------


def test_a_request_id_is_kept_only_when_it_is_a_short_token():
    assert request_id("trace-42.a_b~c") == "trace-42.a_b~c"
    assert request_id("x" * MAX_REQUEST_ID_LENGTH) == "x" * MAX_REQUEST_ID_LENGTH
    for bad in (None, "", "two words", 'quo"te', "line\nbreak", "x" * (MAX_REQUEST_ID_LENGTH + 1), "ünï", "a=b"):
        replaced = request_id(bad)
        assert replaced != bad and re.fullmatch(r"[0-9a-f]{32}", replaced), bad


async def test_a_streamed_chat_completion_is_logged_with_the_clients_request_id(service, flow_dir):
    body = {"messages": USER, "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=60) as client,
        client.stream("POST", CHAT, json=body, headers={"X-Request-Id": "trace-42.a"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "trace-42.a"
        chunks = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    line = await access_line(flow_dir, "trace-42.a")
    assert line["protocol"] == "http" and line["method"] == "POST" and line["route"] == CHAT
    assert line["status"] == "200" and line["finish_reason"] == "length" and line["error_code"] == "-"
    assert int(line["prompt_tokens"]) == usage["prompt_tokens"] and int(line["completion_tokens"]) == 7
    assert_timed(line)


@pytest.mark.parametrize("bad", ["two words", "x" * (MAX_REQUEST_ID_LENGTH + 1), "ünïcode"])
async def test_a_bad_request_id_is_replaced_by_a_fresh_one(service, flow_dir, bad):
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        response = await client.get("/v1/models", headers={"X-Request-Id": bad.encode("latin-1")})
    assert response.status_code == 200
    fresh = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    line = await access_line(flow_dir, fresh)
    assert line["route"] == "/v1/models" and line["status"] == "200" and line["finish_reason"] == "-"
    assert bad not in (flow_dir / "flow" / "flow.log").read_text(errors="replace")


async def test_the_log_keeps_a_stream_streaming_and_logs_the_client_leaving(service, flow_dir):
    """Streaming, not buffering, without a clock: while the client holds each of the first chunks, the executor
    still runs the generation. Then the client leaves: the line says the gateway cancelled it."""
    body = {"prompt": "stream", "max_tokens": LONG, "stream": True}
    running_while_held = []
    async with (
        httpx.AsyncClient(base_url=service.url, timeout=60) as client,
        client.stream("POST", COMPLETIONS, json=body, headers={"X-Request-Id": "leaves-early"}) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                running_while_held.append(service.running_streams())
                if len(running_while_held) == 3:
                    break
    assert running_while_held == [1.0, 1.0, 1.0]
    line = await access_line(flow_dir, "leaves-early")
    assert line["status"] == "200" and line["finish_reason"] == "cancelled"
    assert line["prompt_tokens"] == "-" and line["completion_tokens"] == "-"  # the last document never came
    assert_timed(line)
    await idle(service)


async def test_every_http_protocol_logs_a_line(service, flow_dir):
    fields = {"prompt": "hello there", "max_tokens": 3, "chat_template": False}
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        sse = await client.get("/stream", params=fields, headers={"X-Request-Id": "sse-1"})
        generate = await client.post(
            "/generate", json={"data": [fields, {**fields, "max_tokens": 2}]}, headers={"X-Request-Id": "gen-1"}
        )
        refused = await client.post(
            COMPLETIONS, json={"prompt": "x", "max_tokens": 0}, headers={"X-Request-Id": "bad-1"}
        )
        prediction = await client.post(
            "/v1/predictions", json={"input": fields}, headers={"X-Request-Id": "pred-1"}
        )
    assert [r.status_code for r in (sse, generate, refused, prediction)] == [200, 200, 400, 201]
    assert all(r.headers["x-request-id"] == rid for r, rid in zip(
        (sse, generate, refused, prediction), ("sse-1", "gen-1", "bad-1", "pred-1")
    ))
    sse_line = await access_line(flow_dir, "sse-1")
    assert (sse_line["route"], sse_line["finish_reason"], sse_line["completion_tokens"]) == ("/stream", "length", "3")
    assert_timed(sse_line)
    generate_line = await access_line(flow_dir, "gen-1")
    last_docs = generate.json()["data"]
    assert generate_line["completion_tokens"] == "5"  # the call's two generations
    assert int(generate_line["prompt_tokens"]) == sum(doc["prompt_tokens"] for doc in last_docs)
    refused_line = await access_line(flow_dir, "bad-1")
    assert refused_line["status"] == "400"
    prediction_line = await access_line(flow_dir, "pred-1")
    assert (prediction_line["route"], prediction_line["status"]) == ("/v1/predictions", "201")


async def test_each_websocket_turn_logs_a_line_and_the_connection_one(service, flow_dir):
    ws_url = service.url.replace("http", "ws") + "/ws"
    async with connect(ws_url, additional_headers={"X-Request-Id": "chat-9"}) as ws:
        assert ws.response.headers["x-request-id"] == "chat-9"
        for _ in range(2):
            await ws.send(json.dumps({"type": "prompt", "prompt": "hi", "max_tokens": 4}))
            end = (await receive_until_end(ws))[-1]
            assert end["type"] == "end"
    for turn in ("chat-9.1", "chat-9.2"):
        line = await access_line(flow_dir, turn)
        assert (line["protocol"], line["route"], line["finish_reason"]) == ("ws", "/ws", "length")
        assert line["completion_tokens"] == "4" and int(line["prompt_tokens"]) > 0
        assert_timed(line)
    connection = await access_line(flow_dir, "chat-9")
    assert connection["status"] == "101"


async def test_a_grpc_stream_logs_a_line_with_the_metadatas_request_id(service, flow_dir):
    client = grpc_client(service.grpc_port)
    docs = [
        doc
        async for doc in client.stream_doc(
            on="/stream",
            inputs=PromptDocument(prompt="hello", max_tokens=4, chat_template=False),
            return_type=ModelOutputDocument,
            metadata=(("x-request-id", "grpc-7"),),
        )
    ]
    line = await access_line(flow_dir, "grpc-7")
    assert (line["protocol"], line["method"], line["route"], line["status"]) == ("grpc", "stream_doc", "/stream", "OK")
    assert line["finish_reason"] == "length"
    assert (int(line["prompt_tokens"]), int(line["completion_tokens"])) == (docs[-1].prompt_tokens, 4)
    assert_timed(line)


async def test_a_grpc_call_gets_its_request_id_back_a_bad_one_replaced(service, flow_dir):
    request = SingleDocumentRequest()
    request.header.exec_endpoint = "/stream"
    request.document_cls = PromptDocument
    request.data.doc = PromptDocument(prompt="hello", max_tokens=2, chat_template=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stream_doc = channel.unary_stream(
            "/jina.JinaSingleDocumentRequestRPC/stream_doc",
            request_serializer=lambda data: data,
            response_deserializer=jina_pb2.SingleDocumentRequestProto.FromString,
        )
        echoed = {}
        for given in ("grpc-8", "two words"):
            call = stream_doc(request.proto.SerializeToString(), metadata=((REQUEST_ID_HEADER, given),))
            echoed[given] = (await call.initial_metadata())[REQUEST_ID_HEADER]
            assert len([response async for response in call]) == 2
    assert echoed["grpc-8"] == "grpc-8" and re.fullmatch(r"[0-9a-f]{32}", echoed["two words"])
    for request_id_ in echoed.values():
        line = await access_line(flow_dir, request_id_)
        assert (line["status"], line["finish_reason"], line["completion_tokens"]) == ("OK", "length", "2")


# The executor's metrics ----------------------------------------------------------------------------------------


def metrics_text(service: Service) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{service.monitoring_port}/metrics", timeout=5).read().decode()


async def test_every_series_carries_the_served_model(service, tiny_model_dir):
    """The executor's model id: a local directory's name (the gateway may serve it under another name)."""
    await stream_docs(service, prompt="label", max_tokens=2, chat_template=False)  # llm_requests_total's series
    served = tiny_model_dir.name
    series = [line for line in metrics_text(service).splitlines() if line.startswith("llm_")]
    names = {re.split(r"[{ ]", line)[0] for line in series}
    for name in ("llm_batch_size", "llm_kv_cache_tokens", "llm_prompt_length_tokens_count",
                 "llm_generation_length_tokens_count", "llm_running_streams", "llm_requests_total"):
        assert name in names, name
    assert all(f'model="{served}"' in line for line in series), [s for s in series if served not in s][:3]


async def test_the_length_histograms_count_a_request_with_its_token_counts(service, tiny_model_dir):
    await idle(service)  # the streams of earlier tests are counted
    model = tiny_model_dir.name

    def histogram(name: str) -> tuple[float, float]:
        return service.metric(f"{name}_count", model=model), service.metric(f"{name}_sum", model=model)

    prompts, generations = histogram("llm_prompt_length_tokens"), histogram("llm_generation_length_tokens")
    docs = [doc async for doc in documents(service, prompt="count me", max_tokens=6, chat_template=False)]
    prompt_tokens = docs[-1].prompt_tokens
    assert docs[-1].completion_tokens == 6 and prompt_tokens > 0
    # The engine counts a request before its last document leaves (on_finished): no waiting needed.
    assert histogram("llm_prompt_length_tokens") == (prompts[0] + 1, prompts[1] + prompt_tokens)
    assert histogram("llm_generation_length_tokens") == (generations[0] + 1, generations[1] + 6)
    # In the bucket of its length, and not below: le=8 holds 6 generated tokens, le=4 does not.
    assert service.metric("llm_generation_length_tokens_bucket", model=model, le="8.0") > service.metric(
        "llm_generation_length_tokens_bucket", model=model, le="4.0"
    )


async def test_batch_size_and_kv_cache_gauges_follow_the_running_streams(service):
    await idle(service)
    assert service.metric("llm_batch_size") == 0 and service.metric("llm_kv_cache_tokens") == 0
    [first] = [doc async for doc in documents(service, prompt="long", max_tokens=1, chat_template=False)]
    prompt_tokens = first.prompt_tokens

    async def consume() -> None:
        async for _ in documents(service, prompt="long", max_tokens=LONG, chat_template=False):
            pass

    tasks = [asyncio.create_task(consume()) for _ in range(2)]
    try:
        # Two rows decode together, each holding its prompt and its tokens so far in the cache.
        await eventually(lambda: service.metric("llm_batch_size") == 2)
        await eventually(lambda: service.metric("llm_kv_cache_tokens") > 2 * prompt_tokens)
        assert service.metric("llm_kv_cache_tokens") < 2 * (prompt_tokens + LONG)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await idle(service)
    assert service.metric("llm_batch_size") == 0 and service.metric("llm_kv_cache_tokens") == 0
