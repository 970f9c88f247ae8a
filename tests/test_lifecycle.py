"""The service's lifecycle as an operator sees it: ready only once warmed up, replicas sharing the streams, and
SIGTERM to the `jina flow` process draining the streams before every process exits."""

import asyncio
import os
import signal
import socket
import threading
import time

from grpc_health.v1 import health_pb2
from jina.serve.networking.utils import send_health_check_sync

from harness import ROOT
from harness.processes import free_port, live_processes, running_flow, write_flow
from harness.service import Service, documents, eventually, serve, stream_docs
from schemas import ModelOutputDocument

LONG_STREAM_TOKENS = 4000  # far longer than the grace period on the tiny model: still running when it ends


def executor_is_serving(port: int) -> bool:
    try:
        return send_health_check_sync(f"127.0.0.1:{port}", timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING
    except Exception:  # refused or unavailable: not serving
        return False


def test_health_turns_serving_only_after_warm_up(tmp_path, tiny_model_dir):
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    grpc_port, executor_port = free_port(), free_port()
    executor = {
        "name": "llm",
        "uses": str(ROOT / "tests" / "gated.yml"),
        "port": executor_port,
        "uses_with": {"model": str(tiny_model_dir), "dtype": "float32", "gate_dir": str(gate_dir)},
    }
    flow_file = write_flow(tmp_path / "flow.yml", grpc_port, executor)
    health_during_warm_up: list[bool] = []

    def probe_then_open_gate() -> None:
        while not (gate_dir / "warming").exists():  # the model is loaded, warm-up has begun
            time.sleep(0.05)
        for _ in range(10):
            health_during_warm_up.append(executor_is_serving(executor_port))
            time.sleep(0.1)
        (gate_dir / "open").touch()

    prober = threading.Thread(target=probe_then_open_gate, daemon=True)
    prober.start()
    with running_flow(flow_file, [grpc_port, executor_port], tmp_path / "flow.log"):
        prober.join(timeout=5)
        assert health_during_warm_up == [False] * 10
        assert executor_is_serving(executor_port)


async def test_replicas_share_concurrent_streams(tmp_path_factory, tiny_model_dir):
    uses_with = {"model": str(tiny_model_dir), "dtype": "float32", "max_running": 8}
    with serve(tmp_path_factory, "replicas-flow", uses_with, replicas=2) as service:
        # The gateway sends each prompt to the replica its text picks (gateway/routing.py): with 16 distinct ones,
        # the chance that one replica gets none is 2 in 65536.
        prompts = [f"replica check {i}" for i in range(16)]
        streams = await asyncio.gather(*(stream_docs(service, prompt=p, max_tokens=12) for p in prompts))
        alone = [await stream_docs(service, prompt=p, max_tokens=12) for p in prompts]
        for concurrent, single in zip(streams, alone):
            assert concurrent[-1].finish_reason == "length"
            assert [d.index for d in concurrent] == list(range(12))
            assert concurrent[-1].generated_text == "".join(d.text for d in concurrent)
            assert [d.token_id for d in concurrent] == [d.token_id for d in single]  # greedy: same tokens anywhere
        served = [service.metric("llm_requests_total", replica=r, finish_reason="length") for r in range(2)]
        assert sum(served) == 2 * len(prompts)
        assert all(count > 0 for count in served), f"one replica served everything: {served}"


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on the port (with SO_REUSEADDR, as servers do: connections of the old one
    may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


async def timed_stream(service: Service, **fields) -> list[tuple[float, ModelOutputDocument]]:
    received = []
    async for doc in documents(service, **fields):
        received.append((time.monotonic(), doc))
    return received


async def test_sigterm_to_jina_flow_drains_streams_then_every_process_exits(tmp_path_factory, tiny_model_dir):
    grace = 2.0
    uses_with = {"model": str(tiny_model_dir), "dtype": "float32", "shutdown_grace_s": grace}
    with serve(tmp_path_factory, "sigterm-flow", uses_with) as service:
        flow = service.process
        long_streams = [
            asyncio.create_task(timed_stream(service, prompt=f"a long story {i}", max_tokens=LONG_STREAM_TOKENS))
            for i in range(2)
        ]
        await eventually(lambda: service.running_streams() == 2)
        os.kill(flow.pid, signal.SIGTERM)  # the `jina flow` process alone, as Kubernetes or systemd do
        signalled_at = time.monotonic()

        refusal = None
        for _ in range(50):  # the executor learns of the SIGTERM through its parent's death: within moments
            docs = await stream_docs(service, prompt="a new stream", max_tokens=2)
            if docs[-1].finish_reason == "shutdown":
                refusal = docs
                break
            await asyncio.sleep(0.1)
        assert refusal is not None and len(refusal) == 1, "new streams were not refused after SIGTERM"
        assert "shutting down" in refusal[0].error

        for received in await asyncio.wait_for(asyncio.gather(*long_streams), timeout=30):
            docs = [doc for _, doc in received]
            assert docs[-1].finish_reason == "shutdown"
            assert "shutting down" in docs[-1].error
            assert [d.index for d in docs] == list(range(len(docs)))  # nothing lost on the way out
            assert docs[-1].generated_text == "".join(d.text for d in docs)
            assert any(at > signalled_at for at, doc in received[:-1]), "tokens stopped at SIGTERM: no grace"

        flow.wait(timeout=5)  # reap the parent: it died at once
        ports = [service.grpc_port, service.http_port, *service.monitoring_ports]
        deadline = signalled_at + 30
        while (live_processes(flow.pid) or not all(map(port_is_free, ports))) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert live_processes(flow.pid) == [], "processes of the service outlived SIGTERM by 30 s"
        assert [port for port in ports if not port_is_free(port)] == []
