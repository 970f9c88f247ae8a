"""LLMGateway: Jina's composite gateway (gRPC + HTTP on their own ports) whose HTTP server also serves the
OpenAI-compatible API, the WebSocket chat and the page.

Jina builds the built-in gateway of each protocol inside a CompositeGateway; this one builds the same servers,
except that the HTTP one is LLMHTTPGateway: Jina's default FastAPI app (with its `GET /stream` SSE route), plus
the routes of gateway/app.py. gRPC `stream_doc` on the gRPC port is Jina's own server, whose handler first checks
that the document is a valid PromptDocument (gateway/validation.py) and relays the executor's stream through a
task that the end of the client's call cancels (gateway/relay.py). What this needs of Jina's internals is in
workarounds/jina_gateway.py.
"""

from __future__ import annotations

from fastapi.middleware.cors import CORSMiddleware
from jina.serve.runtimes.gateway.composite import CompositeGateway
from jina.serve.runtimes.gateway.http import HTTPGateway
from prometheus_client import Gauge

from gateway import access_log
from gateway.app import add_routes
from gateway.auth import GrpcKeyInterceptor, Keys, RequireKey, load_keys
from gateway.health import (
    ExecutorWatch,
    RetryLater,
    State,
    add_health_routes,
    executor_addresses,
    exit_flow,
    guarded,
    started_by_jina_flow,
)
from gateway.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_WS_MESSAGE_BYTES,
    DEFAULT_MIN_BODY_RATE,
    BodyLimits,
    HttpLimits,
)
from gateway.model_info import ModelInfo
from gateway.origins import OriginCheck
from gateway.predictions import PredictionSettings, add_prediction_routes
from gateway.relay import relayed
from gateway.routing import prefix_affine
from gateway.unary import DEFAULT_MAX_GENERATE_DOCUMENTS, add_generate_route
from gateway.validation import validating
from lifecycle import OpenStreams, drain_on_sigterm, supervisor
from workarounds import grpc_cancel, jina_gateway, jina_monitoring, jina_routing

# The gateway's gRPC channels to the executors. gRPC backs off from an address that refuses connections (up to two
# minutes between attempts), and the gateway tries its executors while they are still loading the model. By
# default all channels to one address share one subchannel, so Jina's reset of a failed connection (a new channel)
# keeps the backoff. Measured (tests/test_lifecycle.py, 2 replicas): in 3 runs of 6, one replica got none of the
# 16 streams sent after the flow said it was ready (Jina retried them on the other); with a subchannel per channel
# and attempts at most 1 s apart, in none of 8.
EXECUTOR_CHANNEL_OPTIONS = {"grpc.use_local_subchannel_pool": 1, "grpc.max_reconnect_backoff_ms": 1000}

# The gRPC counterpart of the HTTP body limit (gateway/limits.py): grpc's own default, which Jina lifts to "any size".
DEFAULT_MAX_GRPC_MESSAGE_BYTES = 4 * 1024 * 1024


def grpc_server_options(max_grpc_message_bytes: int) -> dict[str, int]:
    """The options of the gateway's gRPC server: a message past the limit ends its call with RESOURCE_EXHAUSTED
    (grpc's message states both sizes), before the gateway reads it."""
    if max_grpc_message_bytes < 1:
        raise ValueError(f"max_grpc_message_bytes must be >= 1, got {max_grpc_message_bytes}")
    return {"grpc.max_receive_message_length": max_grpc_message_bytes}


class LLMHTTPGateway(HTTPGateway):
    """Jina's HTTP gateway plus the OpenAI API, `/ws`, the page at `/` and the predictions."""

    def __init__(
        self,
        watch: ExecutorWatch,
        keys: Keys,
        allowed_origins: frozenset[str],
        limits: HttpLimits,
        max_generate_documents: int,
        model_name: str | None = None,
        predictions: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.watch = watch
        self.keys = keys
        self.allowed_origins = allowed_origins
        self.limits = limits
        self.uvicorn_kwargs.update(limits.uvicorn_kwargs())  # the connection limits (gateway/limits.py)
        self.max_generate_documents = max_generate_documents
        self.model_name = model_name
        self.predictions = PredictionSettings.parse(predictions)  # a wrong setting fails the start

    @property
    def app(self):
        model_info = ModelInfo(self.streamer, self.model_name)
        streamer = access_log.ObservedStreamer(self.streamer)  # the generations' documents reach the access log
        app = add_routes(super().app, streamer, model_info, self.limits)
        add_generate_route(app, streamer, self.max_generate_documents)  # replaces Jina's (gateway/unary.py)
        add_health_routes(app, self.watch)
        app.add_middleware(RetryLater, watch=self.watch)
        app.add_middleware(BodyLimits, limits=self.limits)
        app.add_middleware(RequireKey, keys=self.keys)  # no answer at all without a key
        app.add_middleware(OriginCheck, allowed_origins=self.allowed_origins)
        if self.allowed_origins:  # CORS only for the origins named (preflights carry no key: outermost)
            app.add_middleware(
                CORSMiddleware,
                allow_origins=sorted(self.allowed_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        app = add_prediction_routes(app, streamer, model_info, self.predictions, self.port)
        app.add_middleware(access_log.AccessLog)  # outermost: every answer is logged, refusals included
        return app


class LLMGateway(CompositeGateway):
    """Serve every protocol of the flow (`protocol: [grpc, http]`), the HTTP one with LLMHTTPGateway.

    `model_name`: a name to serve the model under in the OpenAI API and the predictions (as vLLM's
    --served-model-name); None (the default): the executor's own model id (gateway/model_info.py).
    `drain_timeout_s`: on SIGTERM, how long the gateway keeps relaying the streams in flight before it stops.
    The executor ends its own streams within its `shutdown_grace_s`, so this only needs to be a little longer.
    `predictions`: the settings of `/v1/predictions` (gateway/predictions.py: PredictionSettings), e.g. `redis_url`.
    `health_interval_s`: how often the gateway checks that its executors answer (gateway/health.py).
    `retry_after_s`: the `Retry-After` of a 429 or a 503.
    `exit_on_executor_loss`: end the flow with a failure status when an executor that was serving stops answering,
    for its supervisor to restart; by default only under `jina flow` (elsewhere, e.g. Kubernetes, the executor's
    own container is restarted, and the gateway reports unavailable meanwhile).
    `allowed_origins`: web origins (`https://app.example.com`) besides the service's own whose pages may open `/ws`
    and call the HTTP API (CORS); none by default (gateway/origins.py).
    `max_body_bytes`: the largest HTTP request body (413 past it; gateway/limits.py).
    `max_json_depth`, `max_ws_message_bytes`, `header_timeout_s`: how deep a JSON body may nest (400 past it), the
    largest WebSocket message (1009 past it), how long a request's headers may take (408 past it; gateway/limits.py).
    `body_timeout_s`, `min_body_rate`: the longest pause in a request body and its slowest average rate in bytes
    a second (408 past either); `max_header_count`, `max_header_bytes`: the most headers and the largest request
    head (431 past either; gateway/limits.py).
    `max_generate_documents`: the most PromptDocuments one `POST /generate` call takes (gateway/unary.py).
    `max_grpc_message_bytes`: the largest gRPC message the gateway's gRPC server receives (Jina's default: any);
    past it the call ends with RESOURCE_EXHAUSTED.
    `prefix_routing`: send each conversation's turns to one executor replica, whose prefix cache holds its history,
    and on to another when that one refuses (gateway/routing.py); false: Jina's round robin over the replicas.
    """

    def __init__(self, model_name: str | None = None, drain_timeout_s: float = 20.0,
                 predictions: dict | None = None, health_interval_s: float = 0.5, retry_after_s: int = 5,
                 exit_on_executor_loss: bool | None = None, allowed_origins: list[str] | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
                 max_ws_message_bytes: int = DEFAULT_MAX_WS_MESSAGE_BYTES,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, min_body_rate: float = DEFAULT_MIN_BODY_RATE,
                 max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_generate_documents: int = DEFAULT_MAX_GENERATE_DOCUMENTS,
                 max_grpc_message_bytes: int = DEFAULT_MAX_GRPC_MESSAGE_BYTES, prefix_routing: bool = True,
                 **kwargs) -> None:
        # Both raise UnverifiedVersion on a grpcio or jina they were not verified against: the gateway fails to
        # start rather than serve with a workaround that may no longer hold.
        grpc_cancel.install()  # a cancelled relay must cancel its call to the executor
        jina_gateway.install()
        if exit_on_executor_loss is None:
            exit_on_executor_loss = started_by_jina_flow()
        deployments = jina_gateway.runtime_arg(kwargs["runtime_args"], "deployments_addresses")
        keys = Keys(load_keys())  # a key file that names no key fails the start
        origins = frozenset(allowed_origins or ())
        limits = HttpLimits(  # checked here
            max_body_bytes, max_json_depth, max_ws_message_bytes, header_timeout_s, body_timeout_s, min_body_rate,
            max_header_count, max_header_bytes,
        )
        on_lost = exit_flow if exit_on_executor_loss else None
        self.watch = ExecutorWatch(
            executor_addresses(deployments), health_interval_s, retry_after_s, on_lost, wait_for_servers=True
        )
        jina_gateway.build_servers(
            self,
            lambda **server_kwargs: LLMHTTPGateway(
                self.watch, keys, origins, limits, max_generate_documents,
                model_name=model_name, predictions=predictions, **server_kwargs,
            ),
            EXECUTOR_CHANNEL_OPTIONS,
            grpc_server_options(max_grpc_message_bytes),
            **kwargs,
        )
        # Jina's Prometheus endpoint listens on every address: on the metrics host only (loopback by default).
        jina_monitoring.install()
        if self.metrics_registry is not None:  # with `monitoring: true`: the restarts lifecycle/supervisor.py made
            Gauge("llm_flow_restarts", "Times the supervisor has restarted the flow", registry=self.metrics_registry
                  ).set(supervisor.restarts())
        self.model_name = model_name
        self.drain_timeout_s = drain_timeout_s
        self.open_streams = OpenStreams()
        if prefix_routing:  # inside the count of streams: a stream sent on to another replica is still one stream
            jina_routing.install()
            jina_gateway.wrap_stream_calls(self.servers, prefix_affine)
        jina_gateway.wrap_streams(self.servers, self.open_streams.track)
        # A document that is not a valid PromptDocument gets one error document, and the stream to the executor is
        # cancelled as soon as the client's call ends, however it ends (gateway/validation.py, gateway/relay.py).
        # While the engine is unavailable, one error document without a call to the executor (gateway/health.py).
        # Outermost, the access log: a line for every call, also one answered by the wrappers within.
        access_log.install()
        jina_gateway.wrap_grpc_stream_doc(
            self.servers,
            lambda stream_doc: access_log.access_logged(guarded(self.watch, relayed(validating(stream_doc)))),
        )
        jina_gateway.add_grpc_interceptor(self.servers, GrpcKeyInterceptor(keys))
        keys.log_mode(self.logger)
        self.watch.on_change.append(lambda state: jina_gateway.set_grpc_health(self.servers, state is State.SERVING))
        drain_on_sigterm(self._drain)
        self.watch.start()

    async def setup_server(self) -> None:
        jina_gateway.share_cancel(self)  # SIGTERM must stop a start that waits for an executor that never comes
        await super().setup_server()
        await self.watch.servers_listening()

    async def _drain(self) -> None:
        """On SIGTERM, before Jina stops the servers: keep relaying until the streams in flight have ended (new
        ones reach the executor, which refuses them with finish_reason=shutdown), for `drain_timeout_s` at most."""
        self.watch.stop()  # the executors stop too: that is no loss
        self.logger.warning(f"SIGTERM: waiting for {self.open_streams.count} streams in flight")
        await self.open_streams.wait_closed(self.drain_timeout_s)
