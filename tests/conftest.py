"""Shared fixtures: a tiny random-weight model for fast tests, the embedded model for end-to-end ones, and
real flows served as `make serve` serves them (gRPC and HTTP through the service's gateway)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import torch
from jina import Client
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from client import grpc_client as product_grpc_client
from client import stream_documents
from engine.loading import embedded_model_dir
from schemas import ModelOutputDocument, PromptDocument
from tests.servers import free_port, running_flow, write_service_flow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer: real code paths, fast steps."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # room for streams long enough to observe while they run
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class Service:
    grpc_port: int
    http_port: int
    monitoring_ports: list[int]  # the executor's Prometheus endpoint, one per replica
    process: subprocess.Popen | None = None  # the `jina flow` process

    @property
    def monitoring_port(self) -> int:
        return self.monitoring_ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str, replica: int = 0, **labels: str) -> float:
        port = self.monitoring_ports[replica]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
        pattern = rf"^{re.escape(name)}{re.escape('{' + label_text + '}') if labels else ''} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def running_streams(self) -> float:
        return self.metric("llm_running_streams")

    def waiting_streams(self) -> float:
        return self.metric("llm_waiting_streams")

    def cancelled_requests(self) -> float:
        return self.metric("llm_requests_total", finish_reason="cancelled")


@contextmanager
def serve(
    tmp_path_factory,
    name: str,
    uses_with: dict,
    uses: str = "config.yml",
    model_name: str = "test-model",
    replicas: int = 1,
) -> Iterator[Service]:
    """A real `jina flow` like flow.yml, serving the executor of `uses` with `uses_with`, on free ports."""
    tmp = tmp_path_factory.mktemp(name)
    service = Service(free_port(), free_port(), [free_port() for _ in range(replicas)])
    executor = {
        "name": "llm",
        "uses": str(ROOT / uses),
        "uses_with": uses_with,
        "replicas": replicas,
        "monitoring": True,
        "port_monitoring": service.monitoring_ports,
    }
    flow_file = write_service_flow(tmp / "flow.yml", service.grpc_port, service.http_port, executor, model_name)
    ports = [service.grpc_port, service.http_port, *service.monitoring_ports]
    with running_flow(flow_file, ports, tmp / "flow.log") as service.process:
        yield service


def grpc_client(port: int) -> Client:
    """The product's client (client/): Jina's Client, with a cancelled stream reaching the server."""
    return product_grpc_client("127.0.0.1", port)


def documents(service: Service, **fields) -> AsyncIterator[ModelOutputDocument]:
    """The documents of one gRPC `stream_doc` call of a PromptDocument with `fields`, as they arrive."""
    return stream_documents(grpc_client(service.grpc_port), PromptDocument(**fields))


async def stream_docs(service: Service, **fields) -> list[ModelOutputDocument]:
    """Every document of one gRPC `stream_doc` call."""
    return [doc async for doc in documents(service, **fields)]


async def eventually(predicate, attempts: int = 400) -> None:
    """Poll until the predicate holds (20 s at most): for state another process or thread reaches."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


TINY_LIMITS = {"dtype": "float32", "max_running": 4, "max_waiting": 2}


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    """The real flow on the tiny random model: fast, for everything but the model's answers."""
    with serve(tmp_path_factory, "tiny-flow", {"model": str(tiny_model_dir), **TINY_LIMITS}) as service:
        yield service


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory) -> Iterator[Service]:
    """The real flow on the embedded SmolLM2 model, as `make serve` runs it (float32: reproducible)."""
    with serve(tmp_path_factory, "embedded-flow", {"model": "embedded", "dtype": "float32"}) as service:
        yield service
