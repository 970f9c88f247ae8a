"""A killed executor, on real flows of the tiny model: under `jina flow` the whole flow exits with a failure status
at once, for its supervisor to restart; where the gateway stays (Kubernetes, docker-compose) every health surface
says not serving and every request gets a 503 with Retry-After or an unavailable error document, never an
internal address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from email.message import Message

import pytest
from grpc_health.v1 import health_pb2
from jina.serve.networking.utils import send_health_check_sync

from gateway.health import EXIT_SIGNAL
from harness.processes import JINA, live_processes, process_listening_on
from harness.service import TINY_LIMITS, Service, eventually, serve, stream_docs


def gateway_serving(service: Service) -> bool:
    try:
        response = send_health_check_sync(f"127.0.0.1:{service.grpc_port}", timeout=2)
    except Exception:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def kill_executor(service: Service) -> None:
    os.kill(process_listening_on(service.monitoring_port).pid, signal.SIGKILL)


def http(service: Service, method: str, path: str, body: dict | None = None) -> tuple[int, Message, str]:
    """Status, headers (case-insensitive) and body of one request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(service.url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


async def test_a_killed_executor_ends_the_flow_with_a_failure_status(tmp_path_factory, tiny_model_dir):
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS}
    with serve(tmp_path_factory, "crash-exit", uses_with) as service:
        assert service.process is not None
        assert (await stream_docs(service, prompt="hello", max_tokens=3))[-1].finish_reason == "length"
        kill_executor(service)
        await eventually(lambda: service.process.poll() is not None)
        assert service.process.returncode == -EXIT_SIGNAL  # a failure for every supervisor, not a clean stop
        await eventually(lambda: live_processes(service.process.pid) == [])  # the gateway followed


@pytest.fixture
def executor_lost(tmp_path_factory, tiny_model_dir):
    """A flow whose gateway stays up after its executor was killed (as it does in Kubernetes)."""
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS}
    settings = {"exit_on_executor_loss": False, "retry_after_s": 7}
    with serve(tmp_path_factory, "crash-stay", uses_with, gateway_settings=settings) as service:
        assert gateway_serving(service)
        assert http(service, "GET", "/ready")[0] == 200
        kill_executor(service)
        yield service


async def test_after_the_executor_is_lost_every_health_surface_says_not_serving(executor_lost):
    service = executor_lost
    await eventually(lambda: not gateway_serving(service))
    for path in ("/health", "/ready"):
        status, headers, body = http(service, "GET", path)
        assert (status, headers["Retry-After"], json.loads(body)) == (503, "7", {"status": "unavailable"})
    # What the Kubernetes probes of `jina export kubernetes` run against the gateway (tests/test_deploy.py).
    ping = subprocess.run(
        [str(JINA), "ping", "gateway", f"grpc://127.0.0.1:{service.grpc_port}", "--attempts", "1"],
        capture_output=True,
        timeout=60,
    )
    assert ping.returncode != 0


async def test_after_the_executor_is_lost_requests_are_unavailable_never_an_address(executor_lost):
    service = executor_lost
    await eventually(lambda: not gateway_serving(service))
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for method, path, body in [
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}),
        ("GET", "/stream?prompt=hi&max_tokens=3", None),
        ("POST", "/generate", {"data": [{"prompt": "hi", "max_tokens": 3}]}),
    ]:
        status, headers, text = http(service, method, path, body)
        assert (status, headers["Retry-After"]) == (503, "7"), path
        assert json.loads(text)["error"]["code"] == "unavailable", path
        assert "127.0.0.1" not in text and "0.0.0.0" not in text, text
    (doc,) = await stream_docs(service, prompt="hi", max_tokens=3)
    assert (doc.finish_reason, doc.error_code) == ("error", "unavailable")
    assert doc.error == "the engine is unavailable: retry later"
