"""The Prometheus endpoints of the gateway and the executor listen on loopback by default (Jina's listen on every
address), and LLM_METRICS_HOST moves them (workarounds/jina_monitoring.py): on the real flow of the tiny model, and
in this process for the setting."""

from __future__ import annotations

import ipaddress
import socket
import urllib.request

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from harness.processes import free_port
from workarounds import jina_monitoring


def listening_addresses(port: int) -> set[str]:
    return {
        connection.laddr.ip
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    }


def other_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback."""
    return [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback
    ]


def metrics_text(host: str, port: int) -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("process", ["gateway", "executor"])
def test_the_metrics_ports_answer_on_loopback_only(tiny_service, process):
    port = tiny_service.gateway_monitoring_port if process == "gateway" else tiny_service.monitoring_port
    assert listening_addresses(port) == {"127.0.0.1"}
    expected = "jina_" if process == "gateway" else "llm_running_streams"
    assert expected in metrics_text("127.0.0.1", port)
    for address in other_addresses():  # none on a host with loopback only: the bound address above says it all
        assert refused(address, port), f"the {process}'s metrics answer on {address}:{port}"


def test_the_setting_moves_the_endpoint_and_leaves_it_where_it_is_asked():
    registry = CollectorRegistry()
    Counter("probe", "a metric to find", registry=registry).inc()
    port = free_port()
    started, _ = start_http_server(port, registry=registry)  # as Jina starts it: every address
    moved = []
    try:
        assert listening_addresses(port) == {"0.0.0.0"}
        moved = jina_monitoring.install({})
        assert listening_addresses(port) == {"127.0.0.1"} and "probe_total 1.0" in metrics_text("127.0.0.1", port)
        assert jina_monitoring.install({}) == []  # already on the metrics host
        moved = jina_monitoring.install({jina_monitoring.METRICS_HOST_ENV: "0.0.0.0"})  # exposed on purpose
        assert listening_addresses(port) == {"0.0.0.0"} and "probe_total 1.0" in metrics_text("127.0.0.1", port)
    finally:
        for server in moved or [started]:
            server.shutdown()
            server.server_close()
