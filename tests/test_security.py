"""API keys (gateway/auth.py): unit checks of the key rules, then a real flow of the tiny model started with
LLM_API_KEY and small limits (gateway/limits.py), over HTTP, the WebSocket and gRPC; last, every error a client can
provoke over HTTP and the WebSocket, which must say what is wrong without internals."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from jina.excepts import BadServerFlow
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import KEY_ENV, KEY_FILE_ENV, Keys, load_keys
from gateway.origins import same_host
from harness import ROOT
from harness.http import receive_until_end
from harness.service import TINY_LIMITS, Service, grpc_client, serve
from schemas import ModelOutputDocument, PromptDocument

KEYS = ("first-key", "second-key")
APP_ORIGIN = "https://app.example"
# The keyed flow's limits: small, so that tests reach them quickly (the defaults are in gateway/limits.py).
LIMITS = {"max_json_depth": 32, "max_ws_message_bytes": 100_000, "header_timeout_s": 2}


def test_keys_come_from_the_variable_or_the_file(tmp_path):
    assert load_keys({}) == ()
    assert load_keys({KEY_ENV: " a , b "}) == (b"a", b"b")
    key_file = tmp_path / "keys"
    key_file.write_text("c\n\nd,e\n")
    assert load_keys({KEY_FILE_ENV: str(key_file)}) == (b"c", b"d", b"e")
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="holds no API key"):  # meant to be closed: must not come up open
        load_keys({KEY_FILE_ENV: str(key_file)})


def test_only_a_bearer_header_with_a_known_key_passes():
    keys = Keys((b"a", b"bb"))
    assert keys.accepts_authorization("Bearer bb") and keys.accepts_authorization("bearer a")
    for header in (None, "", "Bearer", "Bearer b", "Basic a", "a", "Bearer abb"):
        assert not keys.accepts_authorization(header), header
    assert Keys(()).accepts_authorization(None)  # no keys: open


class Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, line: str) -> None:
        self.lines.append(line)


def test_the_start_up_log_says_whether_the_service_is_open():
    closed, open_ = Logger(), Logger()
    Keys((b"a",)).log_mode(closed)
    Keys(()).log_mode(open_)
    assert "required" in closed.lines[0] and "a" not in closed.lines[0].split("(")[0].split()  # never the key
    assert "OPEN" in open_.lines[0]


# On a real flow started with LLM_API_KEY -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, ",".join(KEYS))  # the flow's processes inherit it
        uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS}
        settings = {"allowed_origins": [APP_ORIGIN], **LIMITS}
        with serve(tmp_path_factory, "keyed-flow", uses_with, gateway_settings=settings) as service:
            yield service


def request(service: Service, method: str, path: str, body: dict | list | bytes | None = None, key: str | None = None):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(service.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_routes_need_the_key_and_the_probes_do_not(keyed_service):
    completion = {"prompt": "hi", "max_tokens": 2}
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", completion),
        ("GET", "/stream?prompt=hi&max_tokens=2", None),
        ("POST", "/generate", {"data": [completion]}),
    ]:
        for key in (None, "wrong-key"):
            status, text = request(keyed_service, method, path, body, key)
            assert status == 401, (path, key)
            assert json.loads(text)["error"]["code"] == "invalid_api_key"
    assert request(keyed_service, "GET", "/v1/models", key=KEYS[1])[0] == 200
    status, text = request(keyed_service, "POST", "/v1/completions", completion, KEYS[0])
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 2
    for path in ("/health", "/ready", "/"):
        assert request(keyed_service, "GET", path)[0] == 200, path


async def test_the_websocket_takes_the_key_as_a_header_or_a_query_parameter(keyed_service):
    ws_url = keyed_service.url.replace("http://", "ws://") + "/ws"
    with pytest.raises(InvalidStatus):
        async with connect(ws_url):
            pass
    prompt = json.dumps({"type": "prompt", "prompt": "hi", "max_tokens": 2})
    for url, headers in [(f"{ws_url}?api_key={KEYS[0]}", None), (ws_url, {"Authorization": f"Bearer {KEYS[1]}"})]:
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(prompt)
            assert json.loads(await ws.recv())["type"] == "start"


async def test_grpc_needs_the_key_in_the_call_metadata(keyed_service):
    client = grpc_client(keyed_service.grpc_port)
    inputs = PromptDocument(prompt="hi", max_tokens=2)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(BadServerFlow, match="UNAUTHENTICATED"):
            async for _ in client.stream_doc(
                on="/stream", inputs=inputs, return_type=ModelOutputDocument, metadata=metadata
            ):
                pass
    docs = [
        doc
        async for doc in client.stream_doc(
            on="/stream", inputs=inputs, return_type=ModelOutputDocument,
            metadata=(("authorization", f"Bearer {KEYS[0]}"),),
        )
    ]
    assert docs[-1].finish_reason == "length"


def test_the_local_flow_binds_its_executor_to_loopback():
    # Measured on a flow like it (tiny model): the executor listened on 127.0.0.1 only, and the gateway reached it.
    flow = yaml.safe_load((ROOT / "flow.yml").read_text())
    assert [executor["host"] for executor in flow["executors"]] == ["127.0.0.1"]


def test_same_host_origins():
    assert same_host("http://127.0.0.1:8080", "127.0.0.1:8080") and same_host("https://Svc.example", "svc.example:443")
    assert not same_host("http://127.0.0.1:8081", "127.0.0.1:8080") and not same_host("https://evil.example", "svc")


async def test_the_websocket_refuses_pages_of_other_origins(keyed_service):
    ws_url = f"{keyed_service.url.replace('http://', 'ws://')}/ws?api_key={KEYS[0]}"
    with pytest.raises(InvalidStatus):
        async with connect(ws_url, origin="https://evil.example"):
            pass
    for origin in (keyed_service.url, APP_ORIGIN):  # its own page, and an allowed one
        async with connect(ws_url, origin=origin) as ws:
            await ws.send(json.dumps({"type": "prompt", "prompt": "hi", "max_tokens": 2}))
            assert json.loads(await ws.recv())["type"] == "start"


def test_cors_answers_only_the_allowed_origins(keyed_service):
    def preflight(origin: str):
        req = urllib.request.Request(keyed_service.url + "/v1/completions", method="OPTIONS")
        req.add_header("Origin", origin)
        req.add_header("Access-Control-Request-Method", "POST")
        req.add_header("Access-Control-Request-Headers", "authorization, content-type")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, response.headers.get("Access-Control-Allow-Origin")
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Access-Control-Allow-Origin")

    assert preflight(APP_ORIGIN) == (200, APP_ORIGIN)
    assert preflight("https://evil.example")[1] is None


def test_bodies_past_the_limit_or_not_json_are_refused_before_any_route(keyed_service):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}

    def post(data: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        req = urllib.request.Request(keyed_service.url + "/v1/completions", data=data, headers={**auth, **headers})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    # Refused on its Content-Length, before the body is read (sending it whole would meet a closed connection).
    connection = http.client.HTTPConnection("127.0.0.1", keyed_service.http_port, timeout=60)
    connection.request("POST", "/v1/completions", headers={**auth, "Content-Type": "application/json",
                                                             "Content-Length": "2000001"})
    response = connection.getresponse()
    message = json.loads(response.read())["error"]["message"]
    assert response.status == 413 and "2000000 bytes (max_body_bytes)" in message
    connection.close()
    # A cross-site form posts text/plain without a CORS preflight.
    status, body = post(b'{"prompt": "hi", "max_tokens": 2}', {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]["message"]


DEEP = b"[" * 10000 + b"]" * 10000  # Python's parser fails past about 1000 levels (RecursionError)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 2):  # inside the body's object: `depth` levels in all
        value = [value]
    return value


def test_json_nested_past_the_limit_gets_a_400_naming_it_on_every_route(keyed_service):
    limit = "deeper than the limit of 32 levels (max_json_depth)"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/predictions", "/generate"):
        for body in (DEEP, json.dumps({"prompt": "hi", "max_tokens": 2, "x": nested(33)}).encode()):
            status, text = request(keyed_service, "POST", path, body, KEYS[0])
            assert status == 400 and f"the request body nests arrays and objects {limit}" in text, (path, text)
        status, text = request(keyed_service, "POST", path, b'{"prompt": "hi", "max_tokens": ', KEYS[0])
        assert status == 400, (path, status, text)  # malformed JSON: 400 as well
    deep_messages = urllib.parse.quote(DEEP.decode())
    status, text = request(keyed_service, "GET", f"/stream?max_tokens=2&messages={deep_messages}", key=KEYS[0])
    assert status == 400 and f"the query parameter `messages` nests arrays and objects {limit}" in text
    # Nesting within the limit is served (a conversation of content parts nests 5 levels).
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "[[[{{{"}]}], "max_tokens": 2}
    assert request(keyed_service, "POST", "/v1/chat/completions", parts, KEYS[0])[0] == 200


async def test_a_websocket_message_past_the_limit_closes_with_1009_naming_it(keyed_service):
    ws_url = f"{keyed_service.url.replace('http://', 'ws://')}/ws?api_key={KEYS[0]}"
    async with connect(ws_url, max_size=None) as ws, connect(ws_url) as other:
        # Under the limit: read and answered (here refused by the engine: a prompt longer than it takes).
        await ws.send(json.dumps({"prompt": "word " * 19_000, "max_tokens": 2}))
        assert (await receive_until_end(ws))[-1]["message"].startswith("the prompt is 95000 characters")
        await ws.send(json.dumps({"prompt": "x" * 100_000, "max_tokens": 2}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert closed.value.rcvd.reason == "message larger than the limit of 100000 bytes (max_ws_message_bytes)"
        # The connection that sent nothing too big goes on, and so does the service.
        await other.send(json.dumps({"prompt": "hi", "max_tokens": 2}))
        assert json.loads(await asyncio.wait_for(other.recv(), 60))["type"] == "start"
    async with connect(ws_url) as again:
        await again.send(json.dumps({"prompt": "hi", "max_tokens": 2}))
        assert json.loads(await asyncio.wait_for(again.recv(), 60))["type"] == "start"


async def test_connections_whose_headers_come_too_slowly_get_408_and_are_closed(keyed_service):
    async def slow_connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", keyed_service.http_port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: service\r\n")  # the headers never end
        await writer.drain()
        return reader, writer

    async def trickle(writer: asyncio.StreamWriter) -> None:
        """Bytes keep coming, a header line every half second: the deadline still holds."""
        with contextlib.suppress(ConnectionError):
            for number in range(240):
                writer.write(f"X-Slow-{number}: 1\r\n".encode())
                await writer.drain()
                await asyncio.sleep(0.5)

    slow = [await slow_connection() for _ in range(20)]
    trickling = asyncio.create_task(trickle(slow[0][1]))
    try:
        # While they hang, a whole request is served.
        status, text = await asyncio.to_thread(request, keyed_service, "GET", "/v1/models", None, KEYS[0])
        assert status == 200 and json.loads(text)["data"]
        for reader, writer in slow:
            answer = await asyncio.wait_for(reader.read(), 60)  # up to the end: the server closes the connection
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), answer
            message = json.loads(body)["error"]["message"]
            assert message == "the request headers took longer than the limit of 2 s (header_timeout_s)"
            writer.close()
    finally:
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
    assert (await asyncio.to_thread(request, keyed_service, "GET", "/v1/models", None, KEYS[0]))[0] == 200


# No internals in answers -------------------------------------------------------------------------------------------

# What must never reach a client: Python reprs (`<class 'x'>`, `<ErrorCode.INTERNAL: 'internal'>`, `{'a': 1}`,
# `ValueError('x')`; a placeholder such as `Bearer <key>` is prose) and tracebacks, validation classes, internal
# addresses (the executor listens on loopback).
LEAKS = re.compile(r"<[\w.]+[ :]|object at 0x|Traceback|File \"|\w+Error\(|ValidationError|validation errors? for|"
                   r"\(type=|\{'|127\.0\.0\.1:|0\.0\.0\.0:|localhost:")
USER = [{"role": "user", "content": "hi"}]


def http_errors(service: Service) -> list[tuple[str, int, str]]:
    """(what was sent, status, body) for every error a client can provoke over HTTP."""
    key = KEYS[0]
    sent: list[tuple[str, str, str, dict | list | bytes | None, str | None]] = [
        ("no key", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, None),
        ("unknown route", "GET", "/nowhere", None, key),
        ("wrong method", "DELETE", "/v1/models", None, key),
        ("unknown model", "GET", "/v1/models/gpt-9", None, key),
        ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [', key),
        ("not UTF-8", "POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', key),
        ("deep JSON", "POST", "/v1/completions", DEEP, key),
        ("body not an object", "POST", "/v1/completions", [1, 2], key),
        ("messages a string", "POST", "/v1/chat/completions", {"messages": "hello", "max_tokens": 2}, key),
        ("max_tokens a string", "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": "ten"}, key),
        ("stop a dict", "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stop": {"a": 1}}, key),
        ("content a dict", "POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": {"a": 1}}], "max_tokens": 2}, key),
        ("role a list", "POST", "/v1/chat/completions",
         {"messages": [{"role": ["user"], "content": "hi"}], "max_tokens": 2}, key),
        ("unknown role", "POST", "/v1/chat/completions",
         {"messages": [{"role": "tool", "content": "hi"}], "max_tokens": 2}, key),
        ("logit_bias key", "POST", "/v1/chat/completions",
         {"messages": USER, "max_tokens": 2, "logit_bias": {"abc": 1}}, key),
        ("tools", "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "tools": [{"a": 1}]}, key),
        ("unknown tool_choice", "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "tools": [
            {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
                "name": "g"}}}, key),
        ("schema that does not compile", "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2,
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}}}, key),
        ("unknown model in a request", "POST", "/v1/completions",
         {"model": "gpt-9", "prompt": "hi", "max_tokens": 2}, key),
        ("prompt a number", "POST", "/v1/completions", {"prompt": 42, "max_tokens": 2}, key),
        ("beyond the context", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, key),
        ("stream without max_tokens", "GET", "/stream?prompt=hi", None, key),
        ("stream max_tokens=abc", "GET", "/stream?prompt=hi&max_tokens=abc", None, key),
        ("stream messages a dict", "GET", "/stream?max_tokens=2&messages=%7B%22a%22%3A1%7D", None, key),
        ("stream without a prompt", "GET", "/stream?max_tokens=2", None, key),
        ("stream body a list", "GET", "/stream", [1], key),
        ("generate without max_tokens", "POST", "/generate", {"data": [{"prompt": "hi"}]}, key),
        ("generate data a string", "POST", "/generate", {"data": "hi"}, key),
        ("prediction without input", "POST", "/v1/predictions", {"stream": True}, key),
        ("unknown prediction", "GET", "/v1/predictions/nope", None, key),
        ("unknown prediction's stream", "GET", "/v1/predictions/nope/stream", None, key),
    ]
    answers = [(what, *request(service, method, path, body, auth)) for what, method, path, body, auth in sent]
    connection = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=60)
    connection.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {key}",
                                                           "Content-Type": "application/json",
                                                           "Content-Length": "2000001"})
    response = connection.getresponse()
    answers.append(("oversized", response.status, response.read().decode()))
    connection.close()
    return answers


async def websocket_errors(service: Service) -> list[tuple[str, str]]:
    sent = [
        ("not JSON", "{nope"),
        ("a list", "[1]"),
        ("deep", DEEP.decode()),
        ("unknown type", json.dumps({"type": {"a": 1}})),
        ("max_tokens a string", json.dumps({"prompt": "hi", "max_tokens": "many"})),
        ("messages a dict", json.dumps({"messages": {"a": 1}})),
        ("beyond the context", json.dumps({"prompt": "hi", "max_tokens": 100000})),
    ]
    answers = []
    async with connect(f"{service.url.replace('http://', 'ws://')}/ws?api_key={KEYS[0]}") as ws:
        for what, message in sent:
            await ws.send(message)
            replies = await receive_until_end(ws)
            assert replies[-1]["type"] == "error", (what, replies)
            answers.append((what, replies[-1]["message"]))
    return answers


async def test_no_error_answer_holds_a_repr_a_traceback_or_an_internal_address(keyed_service):
    answers = await asyncio.to_thread(http_errors, keyed_service)
    for what, status, body in answers:
        assert 400 <= status < 500, (what, status, body)
        assert body.strip(), what
    answers += [(what, 400, message) for what, message in await websocket_errors(keyed_service)]
    leaks = [(what, body) for what, _, body in answers if LEAKS.search(body)]
    assert not leaks
