"""Flows served through the service's gateway (gateway/: LLMGateway), shared by test_http.py and test_browser.py.

A pytest plugin (`pytest_plugins = ["tests.gateway_fixtures"]` in those modules) so that each session-scoped
flow starts once for the whole run. The flow file is written like flow.yml: a `gateway:` section with the custom
gateway, gRPC and HTTP ports, and the executor with its Prometheus port.
"""

from __future__ import annotations

import re
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest
import yaml

from tests.conftest import ROOT, TINY_LIMITS
from tests.servers import free_port, running_flow


@dataclass
class GatewayService:
    grpc_port: int
    http_port: int
    monitoring_port: int  # the executor's Prometheus endpoint

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.monitoring_port}/metrics", timeout=5).read().decode()
        label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
        pattern = rf"^{re.escape(name)}{re.escape('{' + label_text + '}') if labels else ''} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def running_streams(self) -> float:
        return self.metric("llm_running_streams")

    def cancelled_requests(self) -> float:
        return self.metric("llm_requests_total", finish_reason="cancelled")


def write_gateway_flow(path, service: GatewayService, uses_with: dict, model_name: str, uses: str) -> None:
    flow = {
        "jtype": "Flow",
        "gateway": {
            "uses": "LLMGateway",
            "py_modules": [str(ROOT / "gateway" / "__init__.py")],
            "uses_with": {"model_name": model_name},
            "protocol": ["grpc", "http"],
            "port": [service.grpc_port, service.http_port],
        },
        "executors": [
            {
                "name": "llm",
                "uses": str(ROOT / uses),
                "uses_with": uses_with,
                "monitoring": True,
                "port_monitoring": service.monitoring_port,
            }
        ],
    }
    # jtype first: Jina's loader expects it at the top.
    path.write_text(yaml.safe_dump(flow, sort_keys=False))


@contextmanager
def serve_gateway(
    tmp_path_factory, name: str, uses_with: dict, model_name: str = "test-model", uses: str = "config.yml"
) -> Iterator[GatewayService]:
    tmp = tmp_path_factory.mktemp(name)
    service = GatewayService(free_port(), free_port(), free_port())
    write_gateway_flow(tmp / "flow.yml", service, uses_with, model_name, uses)
    ports = [service.grpc_port, service.http_port, service.monitoring_port]
    with running_flow(tmp / "flow.yml", ports, tmp / "flow.log"):
        yield service


@pytest.fixture(scope="session")
def tiny_gateway(tmp_path_factory, tiny_model_dir) -> Iterator[GatewayService]:
    """The gateway flow on the tiny random model: fast, for everything but the model's answers."""
    with serve_gateway(tmp_path_factory, "tiny-gateway", {"model": str(tiny_model_dir), **TINY_LIMITS}) as service:
        yield service


@pytest.fixture(scope="session")
def embedded_gateway(tmp_path_factory) -> Iterator[GatewayService]:
    """The gateway flow on the embedded SmolLM2 model, as `make serve` runs it (float32: reproducible)."""
    with serve_gateway(tmp_path_factory, "embedded-gateway", {"model": "embedded", "dtype": "float32"}) as service:
        yield service
