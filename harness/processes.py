"""Starting and stopping a real `jina flow`: its own process group, free ports, a bounded wait; and finding the
process behind a port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import yaml

from harness import ROOT
from lifecycle.cache import CACHE_ENV

JINA = Path(sys.executable).parent / "jina"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: the sockets stay bound until all are picked (one at a time, the kernel may
    hand out a port it just released again: a flow then got the same port twice and failed to start)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_flow(path: Path, grpc_port: int, executor: dict) -> Path:
    """A flow with Jina's plain gRPC gateway in front of one executor."""
    flow = {"jtype": "Flow", "with": {"protocol": ["grpc"], "port": [grpc_port]}, "executors": [executor]}
    # jtype first: Jina's loader expects it at the top.
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    return path


def write_service_flow(
    path: Path,
    grpc_port: int,
    http_port: int,
    executor: dict,
    model_name: str,
    gateway_settings: dict | None = None,
    gateway_monitoring_port: int | None = None,
) -> Path:
    """A flow like flow.yml: the service's gateway (gateway/: LLMGateway) on gRPC and HTTP, then the executor.
    `gateway_settings`: more of the gateway's `uses_with` (e.g. `predictions`). `gateway_monitoring_port`: the
    gateway's Prometheus endpoint, none without it."""
    gateway: dict = {
        "uses": "LLMGateway",
        "py_modules": [str(ROOT / "gateway" / "__init__.py")],
        "uses_with": {"model_name": model_name, **(gateway_settings or {})},
        "protocol": ["grpc", "http"],
        "port": [grpc_port, http_port],
        # The gateway's cache directory holds nothing but its default prediction store, named by its HTTP port
        # (gateway/predictions.py). In the user's cache every flow on free ports left a file of its own behind;
        # beside the flow file the name is still `make serve`'s, and a supervised restart still finds it.
        "env": {CACHE_ENV: str(path.parent / "gateway-cache")},
    }
    if gateway_monitoring_port is not None:
        gateway.update(monitoring=True, port_monitoring=gateway_monitoring_port)
    flow = {"jtype": "Flow", "gateway": gateway, "executors": [executor]}
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    return path


@contextmanager
def started_flow(
    flow_file: Path, log_file: Path, env: dict[str, str] | None = None, supervised: bool = False
) -> Iterator[subprocess.Popen]:
    """`jina flow --uses flow_file` until the block ends, not waiting for it to be ready (it may never be). The flow
    gets its own session so that the gateway and executor children die with it (SIGTERM to the parent alone leaves
    them holding the ports). `env`: more environment variables for it. `supervised`: under lifecycle/supervisor.py,
    as `make serve` runs it (restarts half a second apart at first)."""
    supervisor = [sys.executable, "-m", "lifecycle.supervisor", "--backoff-s", "0.5"] if supervised else []
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [*supervisor, str(JINA), "flow", "--uses", str(flow_file)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "JINA_LOG_LEVEL": "WARNING", **(env or {})},
        )
    try:
        yield process
    finally:
        stop_process_group(process)


@contextmanager
def running_flow(
    flow_file: Path, ports: list[int], log_file: Path, timeout: float = 180, supervised: bool = False
) -> Iterator[subprocess.Popen]:
    """started_flow, once every port listens and Jina says the flow is ready (RuntimeError with the log's end if
    the flow exits or `timeout` passes first)."""
    with started_flow(flow_file, log_file, supervised=supervised) as process:
        deadline = time.monotonic() + timeout
        while not (all(port_open(p) for p in ports) and "Flow is ready to serve" in log_file.read_text()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flow did not start; log:\n{log_file.read_text()[-4000:]}")
            time.sleep(0.5)
        yield process


def live_processes(group: int) -> list[int]:
    """Pids of the processes of a process group that are still running (zombies have exited)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_process_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to every process of the flow, time to drain and exit, then SIGKILL to whatever is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while live_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with suppress(ProcessLookupError):  # every process of the group has exited
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def process_listening_on(port: int) -> psutil.Process:
    """The local process that listens on `port`: the executor on its monitoring port, the gateway on gRPC's."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid)
    raise LookupError(f"no process listens on port {port}")
