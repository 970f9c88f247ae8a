"""The HTTP side of the gateway flow: Jina's `GET /stream` SSE, the OpenAI-compatible API (raw and through the
official SDK), the WebSocket chat, bad requests, and cancellation when the client goes away. gRPC stream_doc keeps
working on the same flow."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from harness.http import CHAT, COMPLETIONS, USER, receive_until_end, sdk
from harness.service import FRANCE, eventually, idle, serve, stream_docs
from schemas import ModelOutputDocument

LONG = 480  # max_tokens for a stream that is still running when the client leaves


# Helpers ---------------------------------------------------------------------------------------------------------


async def sse_events(response: httpx.Response):
    """(event, data) pairs of a text/event-stream body, as curl -N shows it."""
    event, data = None, []
    async for line in response.aiter_lines():
        if line == "":
            if event is not None or data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue  # a comment (keep-alive ping)
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].lstrip())
    if event is not None or data:
        yield event, "\n".join(data)


async def chat_stream(client: openai.AsyncOpenAI, **kwargs) -> tuple[list[str], list]:
    chunks = [chunk async for chunk in await client.chat.completions.create(stream=True, **kwargs)]
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return texts, chunks


# Jina's own HTTP streaming and gRPC, on the gateway flow ---------------------------------------------------------


@pytest.mark.parametrize("as_json_body", [False, True])
async def test_jina_stream_sse_sends_an_update_per_document_then_end(tiny_service, as_json_body):
    fields = {"prompt": "hello there", "max_tokens": 6, "chat_template": False}
    request = {"json": fields} if as_json_body else {"params": fields}
    async with (
        httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client,
        client.stream("GET", "/stream", **request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [(event, data) async for event, data in sse_events(response)]
    assert [event for event, _ in events] == ["update"] * (len(events) - 1) + ["end"]
    docs = [ModelOutputDocument.parse_raw(data) for _, data in events[:-1]]
    assert [doc.index for doc in docs] == list(range(len(docs)))
    assert docs[-1].finish_reason in ("length", "eos") and all(doc.finish_reason is None for doc in docs[:-1])
    # A data line: a browser's EventSource fires `end` (and the page closes it) instead of reconnecting.
    assert json.loads(events[-1][1]) == {"finish_reason": docs[-1].finish_reason}
    assert "".join(doc.text for doc in docs) == docs[-1].generated_text
    grpc = await stream_docs(tiny_service, **fields)
    assert [doc.generated_text for doc in grpc] == [doc.generated_text for doc in docs]


async def test_jina_stream_takes_what_an_event_source_can_send_in_its_url(tiny_service):
    """A browser's EventSource sends no body: stop strings repeat, a conversation comes as JSON."""
    params = [("messages", json.dumps(USER)), ("max_tokens", "4"), ("stop", "zz"), ("stop", "yy")]
    async with (
        httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client,
        client.stream("GET", "/stream", params=params) as response,
    ):
        assert response.status_code == 200
        events = [(event, data) async for event, data in sse_events(response)]
    grpc = await stream_docs(tiny_service, messages=USER, max_tokens=4, stop=["zz", "yy"])
    assert json.loads(events[-2][1])["generated_text"] == grpc[-1].generated_text
    assert events[-1] == ("end", json.dumps({"finish_reason": grpc[-1].finish_reason}))


BAD_STREAMS = [
    pytest.param({}, "max_tokens", "`max_tokens` is missing (required, of type int)", id="nothing"),
    pytest.param({"prompt": "hi"}, "max_tokens", "`max_tokens` is missing", id="no-max-tokens"),
    pytest.param({"max_tokens": "5"}, None, "`prompt`", id="no-prompt"),
    pytest.param({"prompt": "hi", "max_tokens": "abc"}, "max_tokens", "`max_tokens` must be of type int",
                 id="max-tokens-abc"),
    pytest.param({"prompt": "hi", "max_tokens": "0"}, None, "max_tokens must be at least 1", id="max-tokens-zero"),
    pytest.param({"prompt": "hi", "max_tokens": "5", "stop": ""}, "stop", "`stop` must not be empty", id="stop-empty"),
    pytest.param({"prompt": "hi", "max_tokens": "5", "temperature": "hot"}, "temperature",
                 "`temperature` must be of type float", id="temperature-hot"),
    pytest.param({"prompt": "hi", "max_tokens": "5", "chat_template": "maybe"}, "chat_template",
                 "`chat_template` must be of type bool", id="chat-template-maybe"),
    pytest.param({"messages": "[{", "max_tokens": "5"}, "messages", "the query parameter `messages` is not valid JSON",
                 id="messages-not-json"),
    pytest.param({"messages": '[{"role": "user"}]', "max_tokens": "5"}, "messages",
                 "`messages.0.content` is missing", id="message-without-content"),
    pytest.param({"prompt": "hi", "max_tokens": "100000"}, None, "context", id="beyond-the-context"),
]


@pytest.mark.parametrize("params, param, message", BAD_STREAMS)
async def test_jina_stream_refuses_a_bad_request_with_a_4xx_naming_the_field(tiny_service, params, param, message):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.get("/stream", params=params)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


@pytest.mark.parametrize("body, message", [
    ({"prompt": "hi", "max_tokens": "many"}, "`max_tokens` must be of type int"),
    ([{"prompt": "hi", "max_tokens": 5}], "the request body must be a JSON object"),
], ids=["mistyped", "not-an-object"])
async def test_jina_stream_refuses_a_bad_json_body_too(tiny_service, body, message):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.request("GET", "/stream", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


async def test_grpc_stream_doc_keeps_working_beside_the_http_api(tiny_service):
    docs = await stream_docs(tiny_service, prompt="hello", max_tokens=5)
    assert docs[-1].finish_reason in ("length", "eos")
    assert all(len(a.generated_text) <= len(b.generated_text) for a, b in zip(docs, docs[1:]))


# OpenAI-compatible API -------------------------------------------------------------------------------------------


async def test_models_lists_the_configured_model(tiny_service):
    models = await sdk(tiny_service).models.list()
    assert [model.id for model in models.data] == ["test-model"]


async def test_sdk_chat_stream_joins_to_the_non_stream_answer_with_usage(tiny_service):
    client = sdk(tiny_service)
    request = dict(model="test-model", messages=[{"role": "user", "content": "Say something"}], max_tokens=12)
    texts, chunks = await chat_stream(client, stream_options={"include_usage": True}, **request)
    whole = await client.chat.completions.create(**request)
    assert len(texts) > 1
    assert "".join(texts) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason] and finish[0] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    # Without include_usage, no usage chunk.
    _, plain = await chat_stream(client, **request)
    assert all(chunk.usage is None for chunk in plain)


async def test_sdk_completions_send_the_raw_prompt(tiny_service):
    client = sdk(tiny_service)
    request = dict(model="test-model", prompt="Once upon a time", max_tokens=8)
    stream = await client.completions.create(stream=True, **request)
    texts = [chunk.choices[0].text async for chunk in stream]
    whole = await client.completions.create(**request)
    assert "".join(texts) == whole.choices[0].text
    # Same as the raw prompt over gRPC with chat_template=False: the HTTP layer adds nothing to the prompt.
    docs = await stream_docs(tiny_service, prompt="Once upon a time", max_tokens=8, chat_template=False)
    assert whole.choices[0].text == docs[-1].generated_text
    assert whole.choices[0].finish_reason == {"length": "length", "eos": "stop"}[docs[-1].finish_reason]


async def test_sdk_sampling_options_reach_the_executor(tiny_service):
    client = sdk(tiny_service)
    request = dict(model="test-model", prompt="Random words:", max_tokens=10, temperature=1.5, top_p=0.95)
    first = await client.completions.create(seed=7, **request)
    again = await client.completions.create(seed=7, **request)
    docs = await stream_docs(tiny_service, prompt="Random words:", max_tokens=10, temperature=1.5, top_p=0.95, seed=7,
                           chat_template=False)
    assert first.choices[0].text == again.choices[0].text == docs[-1].generated_text


async def test_stop_strings_end_the_answer(tiny_service):
    client = sdk(tiny_service)
    unstopped = await client.completions.create(model="test-model", prompt="Once upon a time", max_tokens=12)
    text = unstopped.choices[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), "the tiny model's answer should have some text to stop at"
    stopped = await client.completions.create(model="test-model", prompt="Once upon a time", max_tokens=12, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


async def test_multi_turn_chat_answers(tiny_service):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    whole = await sdk(tiny_service).chat.completions.create(model="test-model", messages=messages, max_tokens=5)
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.completion_tokens >= 1


BAD_REQUESTS = [
    pytest.param(CHAT, {"messages": [], "max_tokens": 5}, "messages", id="no-messages"),
    pytest.param(CHAT, {"max_tokens": 5}, "messages", id="messages-missing"),
    pytest.param(CHAT, {"messages": "hello", "max_tokens": 5}, "messages", id="messages-not-a-list"),
    pytest.param(CHAT, {"messages": [{"content": "hi"}], "max_tokens": 5}, "messages", id="message-without-role"),
    pytest.param(CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param(
        CHAT, {"messages": USER, "max_completion_tokens": -3}, "max_completion_tokens", id="max-completion-negative"
    ),
    pytest.param(CHAT, {"messages": USER, "max_tokens": "ten"}, "max_tokens", id="max-tokens-a-string"),
    pytest.param(
        CHAT, {"messages": USER, "max_tokens": 5, "temperature": "hot"}, "temperature", id="temperature-a-string"
    ),
    pytest.param(CHAT, {"messages": USER, "max_tokens": 5, "stop": 3}, "stop", id="stop-a-number"),
    pytest.param(CHAT, {"messages": USER, "max_tokens": 5, "n": 2}, "n", id="n-above-one"),
    pytest.param(CHAT, {"messages": USER, "max_tokens": 100000}, None, id="max-tokens-beyond-the-context"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 5}, None,
                 id="prompt-beyond-the-context"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "   "}], "max_tokens": 5}, None, id="empty-prompt"),
    pytest.param(
        CHAT, {"messages": USER, "max_tokens": 5, "temperature": -1}, "temperature", id="negative-temperature"
    ),
    pytest.param(CHAT, {"messages": USER, "max_tokens": 5, "top_p": 1.5}, "top_p", id="top-p-above-one"),
    pytest.param(COMPLETIONS, {"max_tokens": 5}, "prompt", id="prompt-missing"),
    pytest.param(COMPLETIONS, {"prompt": 42, "max_tokens": 5}, "prompt", id="prompt-a-number"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, "max_tokens", id="completion-max-tokens-negative"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": 5000}, None, id="completion-beyond-the-context"),
    pytest.param(COMPLETIONS, ["not", "an", "object"], None, id="body-not-an-object"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path, body, param", BAD_REQUESTS)
async def test_bad_requests_get_a_4xx_with_openai_error_json_before_any_stream(tiny_service, path, body, param, stream):
    if isinstance(body, dict):
        body = {**body, "stream": stream}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.post(path, json=body)
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


async def test_invalid_json_gets_a_400(tiny_service):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


async def test_sdk_raises_bad_request_for_a_refused_stream(tiny_service):
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(tiny_service).chat.completions.create(
            model="test-model", messages=USER, max_tokens=100000, stream=True
        )
    assert raised.value.status_code == 400 and "context" in raised.value.message


async def test_a_failure_after_the_stream_started_reaches_the_sdk_as_an_error(tmp_path_factory, tiny_model_dir):
    fault_log = tmp_path_factory.mktemp("fault") / "fault.txt"
    uses_with = {"model": str(tiny_model_dir), "dtype": "float32", "fault_log": str(fault_log)}
    with serve(tmp_path_factory, "faulty-gateway", uses_with, uses="tests/faulty.yml") as service:
        client = sdk(service)
        received = []
        with pytest.raises(openai.APIError) as raised:
            stream = await client.completions.create(
                model="test-model", prompt="FAULT here", max_tokens=20, stream=True
            )
            async for chunk in stream:
                received.append(chunk.choices[0].text)
        assert "internal error while processing a token" in raised.value.message
        assert received, "the stream had started: tokens came before the error"
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
            response = await http.post(COMPLETIONS, json={"prompt": "FAULT here", "max_tokens": 20, "stream": True})
        assert response.status_code == 200
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1][len("data: "):])["error"]["message"]
        assert "[DONE]" not in response.text
        # Jina's SSE route: the documents before the failure, the failure as an `error` event, then `end`.
        params = {"prompt": "FAULT here", "max_tokens": 20, "chat_template": False}
        async with (
            httpx.AsyncClient(base_url=service.url, timeout=60) as http,
            http.stream("GET", "/stream", params=params) as response,
        ):
            assert response.status_code == 200
            events = [(event, data) async for event, data in sse_events(response)]
        assert [event for event, _ in events] == ["update"] * (len(events) - 2) + ["error", "end"] and len(events) > 2
        failed = ModelOutputDocument.parse_raw(events[-2][1])
        assert failed.error_code == "internal" and "internal error while processing a token" in failed.error
        assert json.loads(events[-1][1]) == {"finish_reason": "error"}
        # Without streaming the failure is a 5xx with the error JSON.
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
            response = await http.post(COMPLETIONS, json={"prompt": "FAULT here", "max_tokens": 20})
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "internal error while processing a token: RuntimeError"


# Cancellation when the client goes away --------------------------------------------------------------------------


async def test_closing_a_streaming_http_connection_cancels_the_generation(tiny_service):
    await idle(tiny_service)
    cancelled = tiny_service.cancelled_requests()
    body = {"messages": [{"role": "user", "content": "Tell me everything"}], "max_tokens": LONG, "stream": True}
    async with (
        httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client,
        client.stream("POST", CHAT, json=body) as response,
    ):
        assert response.status_code == 200
        seen = 0
        async for _event, _data in sse_events(response):
            seen += 1
            if seen == 3:
                break
        assert tiny_service.running_streams() == 1
    # The connection is closed: the engine stops the stream (finish_reason=cancelled), long before LONG tokens.
    await eventually(lambda: tiny_service.running_streams() == 0)
    assert tiny_service.cancelled_requests() == cancelled + 1


async def test_closing_a_non_streaming_http_connection_cancels_the_generation(tiny_service):
    await idle(tiny_service)
    cancelled = tiny_service.cancelled_requests()
    body = {"prompt": "Tell me everything", "max_tokens": LONG}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        request = asyncio.create_task(client.post(COMPLETIONS, json=body))
        await eventually(lambda: tiny_service.running_streams() == 1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await eventually(lambda: tiny_service.running_streams() == 0)
    assert tiny_service.cancelled_requests() == cancelled + 1


async def test_closing_jina_stream_sse_cancels_the_generation(tiny_service):
    await idle(tiny_service)
    cancelled = tiny_service.cancelled_requests()
    params = {"prompt": "Tell me everything", "max_tokens": LONG, "chat_template": False}
    async with (
        httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client,
        client.stream("GET", "/stream", params=params) as response,
    ):
        async for event, _data in sse_events(response):
            assert event == "update"
            break
    await eventually(lambda: tiny_service.running_streams() == 0)
    assert tiny_service.cancelled_requests() == cancelled + 1


# WebSocket -------------------------------------------------------------------------------------------------------


async def test_websocket_two_turns_then_a_cancel_on_one_connection(tiny_service):
    await idle(tiny_service)
    async with connect(f"ws://127.0.0.1:{tiny_service.http_port}/ws") as ws:
        answers = []
        for number, prompt in enumerate(["first question", "second question"], start=1):
            await ws.send(json.dumps({"type": "prompt", "prompt": prompt, "max_tokens": 6, "chat_template": False}))
            messages = await receive_until_end(ws)
            assert messages[0] == {"type": "start", "id": number}
            tokens = [m for m in messages if m["type"] == "token"]
            end = messages[-1]
            assert end["type"] == "end" and end["id"] == number and end["finish_reason"] in ("length", "eos")
            assert "".join(m["text"] for m in tokens) == end["text"]
            assert end["usage"]["completion_tokens"] >= len(tokens) >= 1
            answers.append(end["text"])
        for prompt, answer in zip(["first question", "second question"], answers):
            docs = await stream_docs(tiny_service, prompt=prompt, max_tokens=6, chat_template=False)
            assert answer == docs[-1].generated_text

        cancelled = tiny_service.cancelled_requests()
        await ws.send(json.dumps({"prompt": "Tell me everything", "max_tokens": LONG}))
        assert json.loads(await ws.recv())["type"] == "start"
        assert json.loads(await ws.recv())["type"] == "token"
        await ws.send(json.dumps({"type": "cancel"}))
        messages = await receive_until_end(ws)
        assert messages[-1] == {"type": "end", "id": 3, "finish_reason": "cancelled"}
        assert sum(m["type"] == "token" for m in messages) < LONG - 1
        await eventually(lambda: tiny_service.running_streams() == 0)
        assert tiny_service.cancelled_requests() == cancelled + 1

        # Still usable, and bad prompts get an error message without closing the connection.
        await ws.send(json.dumps({"prompt": "hello", "max_tokens": 0}))
        assert (await receive_until_end(ws))[-1]["type"] == "error"
        await ws.send(json.dumps({"prompt": "hello", "max_tokens": "many"}))
        assert (await receive_until_end(ws))[-1]["type"] == "error"
        await ws.send(json.dumps({"prompt": "hello", "max_tokens": 3}))
        assert (await receive_until_end(ws))[-1]["type"] == "end"


async def test_closing_the_websocket_cancels_the_generation(tiny_service):
    await idle(tiny_service)
    cancelled = tiny_service.cancelled_requests()
    async with connect(f"ws://127.0.0.1:{tiny_service.http_port}/ws") as ws:
        await ws.send(json.dumps({"prompt": "Tell me everything", "max_tokens": LONG}))
        assert json.loads(await ws.recv())["type"] == "start"
        assert json.loads(await ws.recv())["type"] == "token"
    await eventually(lambda: tiny_service.running_streams() == 0)
    assert tiny_service.cancelled_requests() == cancelled + 1


# The embedded model, end to end ----------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_sdk_streams_the_france_answer_unchanged(embedded_service):
    client = sdk(embedded_service)
    request = dict(model="test-model", messages=[{"role": "user", "content": FRANCE}], max_tokens=30)
    texts, chunks = await chat_stream(client, **request)
    whole = await client.chat.completions.create(**request)
    grpc = await stream_docs(embedded_service, prompt=FRANCE, max_tokens=30)
    assert len(texts) > 3
    assert "".join(texts) == whole.choices[0].message.content == grpc[-1].generated_text
    assert "Paris" in whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop" and grpc[-1].finish_reason == "eos"


@pytest.mark.e2e
async def test_curl_style_jina_stream_gives_the_france_answer(embedded_service):
    async with (
        httpx.AsyncClient(base_url=embedded_service.url, timeout=120) as client,
        client.stream("GET", "/stream", params={"prompt": FRANCE, "max_tokens": 30}) as response,
    ):
        events = [(event, data) async for event, data in sse_events(response)]
    assert events[-1][0] == "end"
    docs = [json.loads(data) for event, data in events if event == "update"]
    assert len(docs) > 3 and "Paris" in docs[-1]["generated_text"]

