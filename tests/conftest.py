"""Shared fixtures: a tiny random-weight model for fast tests, the embedded model for end-to-end ones, and
real flows over gRPC."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine.loading import embedded_model_dir
from tests.servers import free_port, running_flow, write_flow

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
    monitoring_port: int  # the executor's Prometheus endpoint
    http_port: int | None = None


@contextmanager
def serve(tmp_path_factory, name: str, uses_with: dict, uses: str = "config.yml", http: bool = False) -> Iterator[Service]:
    """A real `jina flow` serving the executor of `uses` with `uses_with`, on free ports."""
    tmp = tmp_path_factory.mktemp(name)
    service = Service(free_port(), free_port(), free_port() if http else None)
    executor = {
        "name": "llm",
        "uses": str(ROOT / uses),
        "uses_with": uses_with,
        "monitoring": True,
        "port_monitoring": service.monitoring_port,
    }
    flow_file = write_flow(tmp / "flow.yml", service.grpc_port, executor, service.http_port)
    ports = [service.grpc_port, service.monitoring_port] + ([service.http_port] if http else [])
    with running_flow(flow_file, ports, tmp / "flow.log"):
        yield service


TINY_LIMITS = {"dtype": "float32", "max_running": 4, "max_waiting": 2}


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    """The real flow on the tiny model."""
    with serve(tmp_path_factory, "tiny-flow", {"model": str(tiny_model_dir), **TINY_LIMITS}) as service:
        yield service


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory) -> Iterator[Service]:
    """The real flow on the embedded SmolLM2 model, as `make serve` runs it (float32: reproducible)."""
    with serve(tmp_path_factory, "embedded-flow", {"model": "embedded", "dtype": "float32"}) as service:
        yield service
