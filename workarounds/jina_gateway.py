"""What the service's gateway (gateway/gateway.py) needs of Jina's gateway internals.

- A composite gateway whose HTTP server is our own. Jina's CompositeServer.__init__ builds the built-in server of
  each protocol (`jina.parsers.helper._get_gateway_class`) from `_server_kwargs`, with no hook to choose another
  class for one protocol: `build_servers` runs its parent's __init__ (CompositeBaseServer) and builds the same
  servers, except that the HTTP one comes from the caller.
- Channel options: the streamer (GatewayStreamer), and with it every channel to an executor, is built by
  CompositeBaseServer.__init__ from `runtime_args.grpc_channel_options`; `build_servers` sets the gateway's own
  there first.
- Server options: Jina passes a gateway's `grpc_server_options` (a flow setting) to its gRPC server as a keyword
  argument (GRPCServer.__init__, from the composite's `_server_kwargs`), and builds `grpc.aio.server` with them over
  its defaults (`get_server_side_grpc_options`: `grpc.max_receive_message_length` -1, any size). `build_servers`
  puts the gateway's own there first (gateway/gateway.py: the gRPC message limit).
- gRPC `stream_doc`: Jina's gRPC server registers its request handler's `stream_doc` (`server._request_handler`)
  when it starts (GRPCServer.setup_server). `wrap_grpc_stream_doc` replaces it before that, so that a document
  that is not a valid PromptDocument gets one error document (Jina failed it in the executor's worker and ended
  the client's stream with nothing) and the stream to the executor is cancelled when the client's call ends
  (Jina, when gRPC closed its handler at a `yield`, dropped that stream without cancelling it: measured on gRPC
  stream_doc with 6 client-cancelled streams a round, in 5 rounds of 10 such streams ran on to max_tokens).
- gRPC health: Jina's gRPC server keeps its `grpc.health.v1` servicer in `server.health_servicer` and marks its
  services SERVING once it has started, whatever the executors' state. `set_grpc_health` sets them (and the
  server's overall status, the empty service name `jina ping` and Kubernetes' probes ask) to the executors' state
  (gateway/health.py: after `kill -9` of the executor, Jina's gateway still said SERVING).
- Cancelling a start: each server of a composite gateway keeps an `is_cancel` event of its own, and the runtime's
  SIGTERM handler sets only the composite's. The HTTP server's start waits for the executors' endpoints until its
  own is set: with an executor that never came up, SIGTERM left the gateway running for good (an orphan holding
  its ports after `jina flow` was gone). `share_cancel` gives the servers the composite's event before they start.
- gRPC server interceptors: Jina builds its gRPC server (`grpc.aio.server`) in setup_server with the interceptors
  in `server.grpc_tracing_server_interceptors` (tracing's, or None), and no other way in. `add_grpc_interceptor`
  appends one there before the servers start (gateway/auth.py: API keys in the call metadata).
- Every stream of every protocol (gRPC stream_doc, SSE, OpenAI, WebSocket) goes through the streamer's
  `rpc_stream_doc` (Jina's GatewayStreamer): `wrap_stream_calls` wraps the call (gateway/routing.py: which replica
  serves it), `wrap_streams` the stream it returns (to count the streams in flight).
- Runtime arguments: Jina passes a gateway's __init__ `runtime_args` as a dict or as an argparse Namespace, with
  no accessor for either; `runtime_arg` reads one (the executors' addresses, `deployments_addresses`).
- Jina's HTTP routes: Jina's FastAPI app (`jina.serve.runtimes.gateway.http_fastapi_app_docarrayv2`) has no hook
  to leave out one of its routes; `remove_routes` takes them out of `app.router.routes` by path (and method), for
  the service's own `GET /stream`, `POST /generate` and the page at `/`.
- gRPC messages: the gateway's wrappers of `stream_doc` (gateway/relay.py, validation.py, health.py,
  access_log.py) take and yield Jina's `SingleDocumentRequest`. `StreamDocRequest` names that class,
  `request_endpoint` and `request_document` read a message's endpoint and protobuf document, and
  `document_response` builds the answer to a request that carries one document of our own (an error document),
  as Jina's worker builds the executor's.
tests/test_gateway_relay.py, tests/test_gateway_validation.py, tests/test_http.py and tests/test_grpc_limits.py
prove it on a real flow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

from grpc_health.v1 import health_pb2
from jina.enums import ProtocolType
from jina.parsers.helper import _get_gateway_class
from jina.proto import jina_pb2
from jina.serve.runtimes.gateway.composite import CompositeGateway
from jina.serve.runtimes.gateway.grpc import GRPCGateway
from jina.serve.runtimes.servers import BaseServer
from jina.serve.runtimes.servers.composite import CompositeBaseServer
from jina.types.request.data import SingleDocumentRequest

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"jina": ("3.34",)}
TEST = (
    "tests/test_gateway_relay.py tests/test_gateway_validation.py tests/test_http.py tests/test_crash_recovery.py "
    "tests/test_grpc_limits.py"
)

T = TypeVar("T")
StreamDoc = Callable[..., AsyncIterator[Any]]
StreamCall = Callable[..., Any]  # the streamer's rpc_stream_doc: a request in, an async generator of responses out
# One message of Jina's gRPC `stream_doc`: a client's request, or a response relayed from the executor.
StreamDocRequest: TypeAlias = SingleDocumentRequest


def install() -> None:
    """Check that this jina is one these functions were verified on (UnverifiedVersion if not)."""
    require_verified(__name__, VERIFIED, TEST)


def build_servers(
    gateway: CompositeGateway,
    http_server: Callable[..., BaseServer],
    executor_channel_options: dict[str, Any],
    server_options: dict[str, Any],
    **kwargs: Any,
) -> None:
    """Initialise `gateway` (a CompositeGateway subclass, from its __init__) as Jina's CompositeServer.__init__
    does, except that the HTTP server, unless the gateway works as a load balancer, is `http_server(**its kwargs)`,
    that the channels to the executors get `executor_channel_options` under the flow's own `grpc_channel_options`,
    and the gRPC servers `server_options` under the flow's own `grpc_server_options` (the flow's win)."""
    runtime_args = kwargs["runtime_args"]
    args = runtime_args if isinstance(runtime_args, dict) else vars(runtime_args)
    args["grpc_channel_options"] = {**executor_channel_options, **(args.get("grpc_channel_options") or {})}
    kwargs["grpc_server_options"] = {**server_options, **(kwargs.get("grpc_server_options") or {})}
    CompositeBaseServer.__init__(gateway, **kwargs)  # builds the streamer, and its channels, from runtime_args
    gateway.servers = []
    for server_kwargs in gateway._server_kwargs:
        protocol = server_kwargs["runtime_args"]["protocol"]
        if protocol == ProtocolType.HTTP and not gateway.works_as_load_balancer:
            server = http_server(**server_kwargs)
        else:
            server = _get_gateway_class(protocol, works_as_load_balancer=gateway.works_as_load_balancer)(
                **server_kwargs
            )
        gateway.servers.append(server)
    gateway.gateways = gateway.servers  # as CompositeServer: backwards compatibility


def wrap_grpc_stream_doc(servers: list[BaseServer], wrap: Callable[[StreamDoc], StreamDoc]) -> None:
    """Replace the gRPC request handler's `stream_doc` of each gRPC server by `wrap(stream_doc)`. Call it before
    the servers start."""
    for server in servers:
        if isinstance(server, GRPCGateway):
            handler = server._request_handler
            handler.stream_doc = wrap(handler.stream_doc)


def wrap_stream_calls(servers: list[BaseServer], wrap: Callable[[StreamCall], StreamCall]) -> None:
    """Replace the `rpc_stream_doc` of the servers' streamers (servers may share one) by `wrap(rpc_stream_doc)`:
    every stream the servers relay from the executors is one call of it, `rpc_stream_doc(request=..., ...)`."""
    for streamer in {id(server.streamer): server.streamer for server in servers}.values():
        streamer.rpc_stream_doc = wrap(streamer.rpc_stream_doc)


def wrap_streams(servers: list[BaseServer], wrap: Callable[[AsyncIterator[T]], AsyncIterator[T]]) -> None:
    """Pass every stream the servers relay from the executors through `wrap`."""
    wrap_stream_calls(servers, lambda call: lambda *args, **kwargs: wrap(call(*args, **kwargs)))


async def set_grpc_health(servers: list[BaseServer], serving: bool) -> None:
    """Set the gRPC health of every gRPC server: the overall status ("") and each of Jina's services."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    names = ["", *(service.full_name for service in jina_pb2.DESCRIPTOR.services_by_name.values())]
    for server in servers:
        if isinstance(server, GRPCGateway):
            for name in names:
                await server.health_servicer.set(name, status)


def share_cancel(gateway: CompositeGateway) -> None:
    """Give every server of `gateway` the event the runtime sets on SIGTERM. Call it at the start of setup_server
    (the runtime sets the gateway's event after __init__)."""
    for server in gateway.servers:
        server.is_cancel = gateway.is_cancel


def add_grpc_interceptor(servers: list[BaseServer], interceptor: Any) -> None:
    """Add a grpc.aio server interceptor to each gRPC server. Call it before the servers start."""
    for server in servers:
        if isinstance(server, GRPCGateway):
            server.grpc_tracing_server_interceptors = [*(server.grpc_tracing_server_interceptors or []), interceptor]


def runtime_arg(runtime_args: Any, name: str) -> Any:
    """The runtime argument `name` Jina gave a gateway's __init__ (`runtime_args`: a dict or a Namespace); None when
    it gave none."""
    return (runtime_args if isinstance(runtime_args, dict) else vars(runtime_args)).get(name)


def remove_routes(app: Any, path: str, method: str | None = None) -> None:
    """Take the routes at `path` out of Jina's FastAPI `app` (only those that answer `method`, when given), so that
    a route of our own can take the path."""
    app.router.routes = [
        route for route in app.router.routes
        if not (getattr(route, "path", None) == path and (method is None or method in getattr(route, "methods", ())))
    ]


def request_endpoint(request: StreamDocRequest) -> str:
    """The executor endpoint a `stream_doc` message is for (`/stream`, `/generate`, ...)."""
    return str(request.header.exec_endpoint)


def request_document(request: StreamDocRequest) -> Any:
    """The protobuf document (DocArray's DocProto) a `stream_doc` message carries, unparsed."""
    return request.proto.document


def document_value(document: Any, name: str) -> Any:
    """The value of the field `name` of a protobuf document (`request_document`), without parsing the rest (None
    when it has no such field)."""
    node = document.data.get(name)
    kind = None if node is None else node.WhichOneof("content")
    return None if kind is None else getattr(node, kind)


def document_response(request: StreamDocRequest, doc: Any, document_cls: type) -> StreamDocRequest:
    """The response to `request` that carries `doc` (of `document_cls`), as Jina's worker builds the executor's."""
    response = SingleDocumentRequest()
    response.header.request_id = request.header.request_id
    response.document_cls = document_cls
    response.data.doc = doc
    return response
