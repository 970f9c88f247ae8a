"""The service as `make serve` runs it, for the benchmark: flow.yml itself (the LLMGateway on gRPC and HTTP,
config.yml's executor with flow.yml's settings), on free ports instead of 12345/8080/9090/9091, in its own
process group (harness's running_flow), stopped even on error. Its flow file and log stay in bench/logs/."""

from __future__ import annotations

import inspect
import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.flows import LOGS
from executor import TokenStreamingExecutor
from harness.processes import free_port, running_flow
from lifecycle.cache import CACHE_ENV

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Ports:
    grpc: int
    http: int


def flow_settings() -> dict:
    return yaml.safe_load((ROOT / "flow.yml").read_text())


def model_name(http_port: int) -> str:
    """The id the service's OpenAI API answers to (the executor's model id, unless the flow names another)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def executor_accepts(setting: str) -> bool:
    """Whether the executor has a setting (a newer one, such as `quantization`, may not have landed yet)."""
    return setting in inspect.signature(TokenStreamingExecutor.__init__).parameters


def executor_settings(overrides: dict) -> dict:
    """The uses_with `make serve` gives config.yml's executor (flow.yml's), then overrides."""
    [executor] = flow_settings()["executors"]
    return {**executor.get("uses_with", {}), **overrides}


@contextmanager
def serving(
    name: str, overrides: dict, timeout: float = 300, replicas: int | None = None, gateway_settings: dict | None = None
) -> Iterator[Ports]:
    """flow.yml with its ports replaced by free ones and `overrides` added to the executor's uses_with (and, given
    `replicas`, that many replicas of it), `gateway_settings` to the gateway's."""
    LOGS.mkdir(exist_ok=True)
    flow = flow_settings()
    ports = Ports(free_port(), free_port())
    gateway = flow["gateway"]
    gateway["port"] = [ports.grpc if protocol == "grpc" else ports.http for protocol in gateway["protocol"]]
    # Relative paths in flow.yml are relative to the repository root, where `make serve` runs it; the flow file
    # written here lies in bench/logs/.
    gateway["extra_search_paths"] = [str(ROOT)]
    gateway["py_modules"] = [str(ROOT / module) for module in gateway["py_modules"]]
    gateway["port_monitoring"] = free_port()
    gateway["uses_with"] = {**gateway.get("uses_with", {}), **(gateway_settings or {})}
    # The gateway's default prediction store is named by its HTTP port: a free port's file in the user's cache
    # would be one more left behind by every run (harness/processes.py does the same for the tests' flows).
    gateway["env"] = {**gateway.get("env", {}), CACHE_ENV: str(LOGS / f"{name}.gateway-cache")}
    for executor in flow["executors"]:
        executor["uses"] = str(ROOT / executor["uses"])
        executor["uses_with"] = {**executor.get("uses_with", {}), **overrides}
        if replicas is not None:
            executor["replicas"] = replicas
        replicas = executor.get("replicas", 1)
        executor["port_monitoring"] = free_port() if replicas == 1 else [free_port() for _ in range(replicas)]
    flow_file = LOGS / f"{name}.flow.yml"
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    with running_flow(flow_file, [ports.grpc, ports.http], LOGS / f"{name}.log", timeout=timeout):
        yield ports
