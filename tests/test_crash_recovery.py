"""A killed executor, on real flows of the tiny model: under `jina flow` the whole flow exits with a failure status
at once, for its supervisor to restart, and the predictions read back after the restart; where the gateway stays
(Kubernetes, docker-compose) every health surface says not serving and every request gets a 503 with Retry-After or
an unavailable error document, never an internal address, and serving again once the executor answers again (its
restarted container)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from email.message import Message

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from jina.serve.networking.utils import send_health_check_sync

from gateway.health import EXIT_SIGNAL, ExecutorWatch, State
from gateway.prediction_store import RESTARTED_ERROR
from gateway.predictions import EXECUTOR_LOST_ERROR, GATEWAY_STOPPED_ERROR
from gateway.streams import UNAVAILABLE_MESSAGE
from harness import ROOT
from harness.processes import JINA, free_port, live_processes, process_listening_on
from harness.service import TINY_LIMITS, Service, documents, eventually, serve, stream_docs
from lifecycle.cache import cache_root


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


async def test_a_stream_the_executors_death_cuts_ends_with_an_unavailable_document(tmp_path_factory, tiny_model_dir):
    """Jina's gateway ends such a gRPC call with an error status naming the executor's address (the client raises
    BadServerFlow); the client gets the error document every other failure gives, after the tokens it had."""
    # Paced (tests/paced_executor.py): the stream still runs when the executor is killed.
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS, "pace_s": 0.01}
    settings = {"exit_on_executor_loss": False}
    with serve(tmp_path_factory, "crash-in-flight", uses_with, "tests/paced.yml", gateway_settings=settings) as service:
        stream = documents(service, prompt="hello", max_tokens=3000)
        first = await anext(stream)
        kill_executor(service)
        rest = [doc async for doc in stream]
    assert first.finish_reason is None and rest
    assert all(doc.finish_reason is None for doc in rest[:-1])
    last = rest[-1]
    assert (last.finish_reason, last.error_code, last.error) == ("error", "unavailable", UNAVAILABLE_MESSAGE)


async def health_server(port: int) -> grpc.aio.Server:
    """What the gateway asks of an executor: a gRPC health service, here answering SERVING."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@pytest.mark.parametrize("interval_s", [0.05, 3600], ids=["polled", "connection watched"])
async def test_the_watch_turns_serving_again_once_a_lost_executor_answers_again(interval_s):
    """With exit_on_executor_loss false (on_lost None), as in Kubernetes: the executor's container is restarted on
    the same address, and the gateway must serve again without a restart of its own. With checks an hour apart,
    only the watch of the connection itself can see the executor go (its kernel closes the connection when it
    dies) and come back."""
    port = free_port()
    watch = ExecutorWatch([f"127.0.0.1:{port}"], interval_s=interval_s, retry_after_s=5, on_lost=None, timeout_s=1)
    states: list[State] = []
    watch.on_change.append(states.append)
    watch.start()
    try:
        await eventually(lambda: states == [State.STARTING])  # nobody listens yet: still starting, not lost
        server = await health_server(port)
        await eventually(lambda: watch.serving)
        await server.stop(grace=None)  # the executor is gone
        await eventually(lambda: watch.state is State.UNAVAILABLE)
        server = await health_server(port)  # restarted
        await eventually(lambda: watch.serving)
        await server.stop(grace=None)
    finally:
        watch.stop()
    assert states == [State.STARTING, State.SERVING, State.UNAVAILABLE, State.SERVING]


async def test_the_watch_serves_only_once_the_gateways_servers_listen():
    """The gateway's HTTP server answers `/ready` while its gRPC server may still wait to bind (after a restart
    the gRPC port refused connections while `/ready` said 200): serving waits for both."""
    port = free_port()
    server = await health_server(port)
    watch = ExecutorWatch([f"127.0.0.1:{port}"], interval_s=0.05, retry_after_s=5, on_lost=None, timeout_s=1,
                          wait_for_servers=True)
    states: list[State] = []
    watch.on_change.append(states.append)
    watch.start()
    try:
        await asyncio.sleep(0.5)  # ten checks, each answered SERVING
        assert watch.state is State.STARTING
        await watch.servers_listening()
        await eventually(lambda: watch.serving)
    finally:
        watch.stop()
        await server.stop(grace=None)
    assert states == [State.STARTING, State.STARTING, State.SERVING]


def test_the_supervisor_restarts_a_failing_command_with_its_restart_count_until_it_stops_cleanly(tmp_path):
    """lifecycle/supervisor.py around a command that fails twice, then exits 0 (a clean stop ends the supervisor)."""
    seen = tmp_path / "seen"
    child = (
        "import os, sys; n = int(os.environ['LLM_FLOW_RESTARTS']); "
        f"open({str(seen)!r}, 'a').write(f'{{n}} '); sys.exit(0 if n == 2 else 3)"
    )
    supervisor = [sys.executable, "-m", "lifecycle.supervisor", "--backoff-s", "0.05", sys.executable, "-c", child]
    assert subprocess.run(supervisor, cwd=ROOT, timeout=60).returncode == 0
    assert seen.read_text().split() == ["0", "1", "2"]


def ready(service: Service) -> bool:
    try:
        return http(service, "GET", "/ready")[0] == 200
    except OSError:  # the flow restarting: nobody listens
        return False


async def test_under_the_supervisor_a_killed_executor_is_back_without_a_person(tmp_path_factory, tiny_model_dir):
    """`make serve`'s way: the flow that lost its executor exits, the supervisor starts it again, and the service
    serves again, its gateway counting the restart."""
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS}
    with serve(tmp_path_factory, "crash-supervised", uses_with, supervised=True) as service:
        assert service.gateway_metric("llm_flow_restarts") == 0
        kill_executor(service)
        await eventually(lambda: not ready(service))
        await eventually(lambda: ready(service), attempts=2400)  # a new flow: 2 minutes at most
        assert (await stream_docs(service, prompt="hello", max_tokens=3))[-1].finish_reason == "length"
        assert service.gateway_metric("llm_flow_restarts") == 1


async def poll_to_end(client: httpx.AsyncClient, id: str) -> dict:
    while (body := (await client.get(f"/v1/predictions/{id}", params={"wait": 30})).json())["status"] in (
            "starting", "processing"):
        pass
    return body


async def test_under_the_supervisor_no_prediction_is_lost_when_the_executor_is_killed(
        tmp_path_factory, tiny_model_dir):
    """The default store (SQLite, its file named by the HTTP port in the cache directory) across `make serve`'s
    restart: the restarted gateway finds the same file, a finished prediction reads back whole, and the one that
    was running when the executor died reads failed, with an error that says why, never processing."""
    # Paced (tests/paced_executor.py): the long prediction still runs when the executor is killed.
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS, "pace_s": 0.01}
    with serve(tmp_path_factory, "crash-predictions", uses_with, "tests/paced.yml", supervised=True) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
            created = await client.post("/v1/predictions", json={"input": {"prompt": "hello", "max_tokens": 8}})
            done = created.json()["id"]
            assert (await poll_to_end(client, done))["status"] == "succeeded"
            finished = (await client.get(f"/v1/predictions/{done}")).json()
            created = await client.post("/v1/predictions", json={"input": {"prompt": "go on", "max_tokens": 3000}})
            running = created.json()["id"]
            polled = await client.get(f"/v1/predictions/{running}", params={"offset": 1, "wait": 60})
            assert polled.json()["status"] == "processing" and polled.json()["output"]
        kill_executor(service)
        await eventually(lambda: not ready(service))
        await eventually(lambda: ready(service), attempts=2400)  # a new flow: 2 minutes at most
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
            assert (await client.get(f"/v1/predictions/{done}")).json() == finished
            interrupted = (await client.get(f"/v1/predictions/{running}")).json()
    # Both runs' gateways kept the one file, in the cache directory the flow gives them (harness/processes.py).
    name = f"predictions-{service.http_port}.sqlite3"
    assert len(list(tmp_path_factory.getbasetemp().glob(f"crash-predictions[0-9]*/gateway-cache/{name}"))) == 1
    assert not (cache_root() / name).exists()
    assert (interrupted["status"], interrupted["error_code"]) == ("failed", "unavailable")
    assert interrupted["error"] in (EXECUTOR_LOST_ERROR, GATEWAY_STOPPED_ERROR, RESTARTED_ERROR)
    assert interrupted["completed_at"] and interrupted["output"]
