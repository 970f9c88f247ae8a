"""Every workaround of a private internal (or an unfixed quirk) of Jina, grpc, asyncio and torch, fenced in one
package.

Each module says what it mends, with what was measured, and names the versions it was verified against
(`VERIFIED`). Its `install()` (or the function that reaches the internal) first checks that the installed version
is one of them and raises UnverifiedVersion otherwise: an upgrade must re-run the module's test before it serves.
Nothing is installed by importing this package or its modules: the entry points that need a workaround (the
gateway, the executor, client.grpc_client()) install it explicitly. Nothing outside this package touches a private
name of Jina, grpc, asyncio or torch.

- grpc_cancel:     grpc.aio loses a cancellation that comes just as a streaming call starts (client and gateway).
- grpc_aio_poller: grpc.aio restarts its poller whenever a process has no channel left, and a restart can lose events.
- jina_gateway:    a composite gateway with the service's own HTTP server and gRPC server options; wrapping gRPC
                   stream_doc and the streams; runtime arguments, Jina's HTTP routes and its gRPC messages.
- jina_worker:     Jina's worker drops an executor's generator at a `yield` without closing it.
- asyncio_signals: running the SIGTERM handler Jina installed, after a drain of our own.
- jina_client:     Jina's gRPC client drops stream_doc's call metadata (an API key).
- jina_monitoring: Jina's Prometheus endpoints listen on every address; moved to the metrics host (loopback).
- jina_routing:    Jina's gateway takes no say in which replica serves a request; a chooser per context picks it.
- uvicorn_protocols: uvicorn never times a request's headers (slowloris); its 1009 close names no limit.
- torch_cpu_ops:   torch's private CPU matmul ops (oneDNN and MKL pre-packed weights, weight-only int8 and int4)
                   that engine/fast/linear.py's weight formats call; checked when a weight is packed.
"""

from workarounds.versions import UnverifiedVersion

__all__ = ["UnverifiedVersion"]
