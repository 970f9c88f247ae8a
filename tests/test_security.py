"""API keys (gateway/auth.py): unit checks of the key rules, then a real flow of the tiny model started with
LLM_API_KEY, over HTTP, the WebSocket and gRPC."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest
import yaml
from jina.excepts import BadServerFlow
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.auth import KEY_ENV, KEY_FILE_ENV, Keys, load_keys
from gateway.origins import same_host
from harness import ROOT
from harness.service import TINY_LIMITS, Service, grpc_client, serve
from schemas import ModelOutputDocument, PromptDocument

KEYS = ("first-key", "second-key")
APP_ORIGIN = "https://app.example"


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
        settings = {"allowed_origins": [APP_ORIGIN]}
        with serve(tmp_path_factory, "keyed-flow", uses_with, gateway_settings=settings) as service:
            yield service


def request(service: Service, method: str, path: str, body: dict | None = None, key: str | None = None):
    data = None if body is None else json.dumps(body).encode()
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
