"""LLMGateway: Jina's composite gateway (gRPC + HTTP on their own ports) whose HTTP server also serves the
OpenAI-compatible API, the WebSocket chat and the page.

Jina builds the built-in gateway of each protocol inside a CompositeGateway; this one builds the same servers,
except that the HTTP one is LLMHTTPGateway: Jina's default FastAPI app (with its `GET /stream` SSE route), plus
the routes of gateway/app.py. gRPC `stream_doc` on the gRPC port is Jina's own server, untouched.
"""

from __future__ import annotations

from typing import List

from jina.enums import ProtocolType
from jina.parsers.helper import _get_gateway_class
from jina.serve.runtimes.gateway.composite import CompositeGateway
from jina.serve.runtimes.gateway.http import HTTPGateway
from jina.serve.runtimes.servers import BaseServer
from jina.serve.runtimes.servers.composite import CompositeBaseServer

from gateway.app import add_routes

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
    """

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME, **kwargs) -> None:
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
