"""The service as `make serve` runs it (the service's gateway on gRPC and HTTP, then the executor), started on
free ports, and the clients that talk to it: the product's gRPC client and the seed tutorial's two-field one."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from docarray import BaseDoc
from jina import Client

from client import grpc_client as product_grpc_client
from client import stream_documents
from harness import ROOT
from harness.processes import free_ports, running_flow, write_service_flow
from schemas import ModelOutputDocument, PromptDocument

FRANCE = "what is the capital of France ?"  # the seed tutorial's prompt
# The tiny model's flow: limits small enough that a test fills the batch and the queue with a few streams.
TINY_LIMITS = {"dtype": "float32", "max_running": 4, "max_waiting": 2}


@dataclass
class Service:
    grpc_port: int
    http_port: int
    monitoring_ports: list[int]  # the executor's Prometheus endpoint, one per replica
    gateway_monitoring_port: int  # the gateway's own (Jina's request metrics)
    process: subprocess.Popen | None = None  # the `jina flow` process

    @property
    def monitoring_port(self) -> int:
        return self.monitoring_ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str, replica: int = 0, **labels: str) -> float:
        """The value of the executor's first series of `name` that has `labels` (it may have others: every series
        of the executor's carries `model`); 0 when there is none."""
        value = series(self.monitoring_ports[replica], name, labels)
        return 0.0 if value is None else value

    def gateway_metric(self, name: str) -> float | None:
        """The value of the gateway's own series `name`; None when it has none."""
        return series(self.gateway_monitoring_port, name, {})

    def running_streams(self) -> float:
        return self.metric("llm_running_streams")

    def waiting_streams(self) -> float:
        return self.metric("llm_waiting_streams")

    def cancelled_requests(self) -> float:
        return self.metric("llm_requests_total", finish_reason="cancelled")


def series(port: int, name: str, labels: dict[str, str]) -> float | None:
    """The value of the first series of `name` with `labels` on the Prometheus endpoint at `port`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for match in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, re.MULTILINE):
        if wanted <= set(re.findall(r'\w+="[^"]*"', match.group(1) or "")):
            return float(match.group(2))
    return None


@contextmanager
def serve(
    tmp_path_factory,
    name: str,
    uses_with: dict,
    uses: str = "config.yml",
    model_name: str = "test-model",
    replicas: int = 1,
    gateway_settings: dict | None = None,
    supervised: bool = False,
) -> Iterator[Service]:
    """A real `jina flow` like flow.yml, serving the executor of `uses` with `uses_with`, on free ports.
    `tmp_path_factory` is pytest's, or anything whose `mktemp(name)` makes a fresh directory. `gateway_settings`:
    more of the gateway's `uses_with` than `model_name`. `supervised`: under lifecycle/supervisor.py, as `make serve`
    runs it."""
    tmp = tmp_path_factory.mktemp(name)
    grpc_port, http_port, metrics_port, *replica_ports = free_ports(3 + replicas)
    service = Service(grpc_port, http_port, replica_ports, metrics_port)
    executor = {
        "name": "llm",
        "uses": str(ROOT / uses),
        "uses_with": uses_with,
        "replicas": replicas,
        "monitoring": True,
        "port_monitoring": service.monitoring_ports,
    }
    flow_file = write_service_flow(
        tmp / "flow.yml", service.grpc_port, service.http_port, executor, model_name, gateway_settings,
        service.gateway_monitoring_port,
    )
    ports = [service.grpc_port, service.http_port, *service.monitoring_ports, service.gateway_monitoring_port]
    with running_flow(flow_file, ports, tmp / "flow.log", supervised=supervised) as service.process:
        wait_ready(service)
        yield service


def wait_ready(service: Service, attempts: int = 600) -> None:
    """Until `GET /ready` answers 200 (60 s at most). Jina says "Flow is ready" once the executors listen, a moment
    before the gateway's own health check (gateway/health.py) has seen them answer; a stream sent in between is
    refused as unavailable."""
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"{service.url}/ready", timeout=5):
                return
        except OSError:  # 503 (an HTTPError) while starting, or a refused connection
            time.sleep(0.1)
    raise RuntimeError(f"the gateway at {service.url} did not become ready")


def grpc_client(port: int) -> Client:
    """The product's client (client/): Jina's Client, with a cancelled stream reaching the server."""
    return product_grpc_client("127.0.0.1", port)


def documents(service: Service, **fields) -> AsyncIterator[ModelOutputDocument]:
    """The documents of one gRPC `stream_doc` call of a PromptDocument with `fields`, as they arrive."""
    return stream_documents(grpc_client(service.grpc_port), PromptDocument(**fields))


async def stream_docs(service: Service, **fields) -> list[ModelOutputDocument]:
    """Every document of one gRPC `stream_doc` call."""
    return [doc async for doc in documents(service, **fields)]


class SeedPromptDocument(BaseDoc):  # the seed tutorial's two-field schemas, exactly
    prompt: str
    max_tokens: int


class SeedModelOutputDocument(BaseDoc):
    token_id: int
    generated_text: str


async def seed_client_texts(service: Service, prompt: str, max_tokens: int) -> list[str]:
    """The `generated_text` of each document, as the seed tutorial's client with its own schemas receives them."""
    return [
        doc.generated_text
        async for doc in grpc_client(service.grpc_port).stream_doc(
            on="/stream",
            inputs=SeedPromptDocument(prompt=prompt, max_tokens=max_tokens),
            return_type=SeedModelOutputDocument,
        )
    ]


async def eventually(predicate: Callable[[], object], attempts: int = 400) -> None:
    """Poll until the predicate holds (20 s at most): for state another process or thread reaches."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def idle(service: Service) -> None:
    """Until the executor's engine holds no stream, running or queued: one that a client left has been cancelled,
    freed and counted (the engine counts a request before it publishes that it no longer holds it)."""
    await eventually(lambda: service.running_streams() == 0 and service.waiting_streams() == 0)
