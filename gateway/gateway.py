"""LLMGateway: Jina's composite gateway (gRPC + HTTP on their own ports) whose HTTP server also serves the
OpenAI-compatible API, the WebSocket chat and the page.

Jina builds the built-in gateway of each protocol inside a CompositeGateway; this one builds the same servers,
except that the HTTP one is LLMHTTPGateway: Jina's default FastAPI app (with its `GET /stream` SSE route), plus
the routes of gateway/app.py. gRPC `stream_doc` on the gRPC port is Jina's own server, whose handler first checks
that the document is a valid PromptDocument (gateway/validation.py) and relays the executor's stream through a
task that the end of the client's call cancels (gateway/relay.py).
"""

from __future__ import annotations

from typing import Any, List

from jina.enums import ProtocolType
from jina.parsers.helper import _get_gateway_class
from jina.serve.runtimes.gateway.composite import CompositeGateway
from jina.serve.runtimes.gateway.grpc import GRPCGateway
from jina.serve.runtimes.gateway.http import HTTPGateway
from jina.serve.runtimes.servers import BaseServer
from jina.serve.runtimes.servers.composite import CompositeBaseServer

from client import grpc_cancel
from gateway.app import add_routes
from gateway.relay import relayed
from gateway.validation import validating
from lifecycle import OpenStreams, drain_on_sigterm

DEFAULT_MODEL_NAME = "llm"


class LLMHTTPGateway(HTTPGateway):
    """Jina's HTTP gateway plus the OpenAI API, `/ws` and the page at `/`."""

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name

    @property
    def app(self):
        return add_routes(super().app, self.streamer, self.model_name)


class LLMGateway(CompositeGateway):
    """Serve every protocol of the flow (`protocol: [grpc, http]`), the HTTP one with LLMHTTPGateway.

    `model_name`: the model id that `GET /v1/models` lists and responses carry when a request names none.
    `drain_timeout_s`: on SIGTERM, how long the gateway keeps relaying the streams in flight before it stops.
    The executor ends its own streams within its `shutdown_grace_s`, so this only needs to be a little longer.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME, drain_timeout_s: float = 20.0, **kwargs) -> None:
        grpc_cancel.install()  # a cancelled relay must cancel its call to the executor (client/grpc_cancel.py)
        # CompositeServer.__init__ would build the built-in servers; build them here instead.
        CompositeBaseServer.__init__(self, **kwargs)
        self.model_name = model_name
        self.servers: List[BaseServer] = []
        for server_kwargs in self._server_kwargs:
            protocol = server_kwargs["runtime_args"]["protocol"]
            if protocol == ProtocolType.HTTP and not self.works_as_load_balancer:
                server = LLMHTTPGateway(model_name=model_name, **server_kwargs)
            else:
                server = _get_gateway_class(protocol, works_as_load_balancer=self.works_as_load_balancer)(
                    **server_kwargs
                )
            self.servers.append(server)
        self.gateways = self.servers  # as CompositeServer: backwards compatibility
        self.drain_timeout_s = drain_timeout_s
        self._streams = OpenStreams()
        for streamer in {id(server.streamer): server.streamer for server in self.servers}.values():
            self._count_streams(streamer)
        for server in self.servers:
            if isinstance(server, GRPCGateway):
                self._wrap_stream_doc(server)
        drain_on_sigterm(self._drain)

    def _count_streams(self, streamer: Any) -> None:
        """Every stream of every protocol (gRPC stream_doc, SSE, OpenAI, WebSocket) goes through the streamer's
        `rpc_stream_doc`: wrap it to know how many streams the gateway is relaying."""
        relay = streamer.rpc_stream_doc
        streamer.rpc_stream_doc = lambda *args, **kwargs: self._streams.track(relay(*args, **kwargs))

    @staticmethod
    def _wrap_stream_doc(server: GRPCGateway) -> None:
        """gRPC `stream_doc` answers a document that is not a valid PromptDocument with one error document (Jina
        would fail it in the executor's worker and end the client's stream with nothing), and cancels the stream
        to the executor when the client's call ends (Jina may leave it running to max_tokens). The server
        registers its request handler's `stream_doc` when it starts (GRPCServer.setup_server), after this: wrap
        it here."""
        handler = server._request_handler
        handler.stream_doc = relayed(validating(handler.stream_doc))

    async def _drain(self) -> None:
        """On SIGTERM, before Jina stops the servers: keep relaying until the streams in flight have ended (new
        ones reach the executor, which refuses them with finish_reason=shutdown), for `drain_timeout_s` at most."""
        self.logger.warning(f"SIGTERM: waiting for {self._streams.count} streams in flight")
        await self._streams.wait_closed(self.drain_timeout_s)
