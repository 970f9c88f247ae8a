"""Jina's Prometheus endpoints listen on the metrics host: loopback unless `LLM_METRICS_HOST` names another address.

Jina starts a process's Prometheus endpoint (`port_monitoring`: the gateway's 9090, the executor's 9091) with
prometheus_client.start_http_server(port), which listens on every address (0.0.0.0), while it builds the process's
server (MonitoringMixin._setup_monitoring, from BaseServer.__init__); it keeps neither the HTTP server nor its
thread, and has no setting for the address. In the executor's process nothing of the service runs before that (the
executor's module is imported after it), so the endpoint cannot be started elsewhere: `serve_metrics_on` moves it
once the process's own code runs (the gateway's __init__; the executor's, through jina_worker.install()). It finds
the WSGI server prometheus_client started (the only wsgiref server in these processes), stops it, and serves the
same app on the metrics host and the same port. Until then, before the process serves anything and with Jina's
counters at zero, the endpoint listens on every address: measured on a busy 2-core host, the gateway's for 1.4 s,
the executor's for 11 s (while its module imports torch, before it calls jina_worker.install()).
tests/test_metrics_ports.py proves it on a real flow.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer, make_server

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"jina": ("3.34",), "prometheus-client": ("0.21",)}
TEST = "tests/test_metrics_ports.py"

METRICS_HOST_ENV = "LLM_METRICS_HOST"
DEFAULT_METRICS_HOST = "127.0.0.1"  # the metrics name no secret, but they are not for everyone who reaches the host


def install(environ: Mapping[str, str] = os.environ) -> list[WSGIServer]:
    """Check the versions (UnverifiedVersion if unverified), then move this process's Prometheus endpoint to the
    metrics host (`LLM_METRICS_HOST`, loopback by default). Returns the servers it moved."""
    require_verified(__name__, VERIFIED, TEST)
    return serve_metrics_on(environ.get(METRICS_HOST_ENV) or DEFAULT_METRICS_HOST)


def serve_metrics_on(host: str) -> list[WSGIServer]:
    """Serve every WSGI server of this process that listens on another address on `host`, same port and app."""
    # type(), not isinstance(): a look at `__class__` could run a proxy's code on an arbitrary object.
    servers = [obj for obj in gc.get_objects() if issubclass(type(obj), WSGIServer)]
    moved = []
    for server in servers:
        address, port = server.server_address[:2]
        if address == host or server.socket.fileno() < 0:  # already there, or a closed one gc has not freed yet
            continue
        app = server.get_app()
        server.shutdown()  # waits for its serve_forever loop to end (half a second at most)
        server.server_close()
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("MetricsServer", (type(server),), {"address_family": family})
        relocated: WSGIServer = make_server(host, port, app, server_class, handler_class=server.RequestHandlerClass)
        threading.Thread(target=relocated.serve_forever, name=f"metrics-{port}", daemon=True).start()
        moved.append(relocated)
    return moved
