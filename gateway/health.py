"""Honest health: the gateway serves only while every executor it relays to answers its gRPC health check.

Jina's gateway never notices a dead executor: after `kill -9` of the executor its gRPC health stayed SERVING,
`GET /` answered 200, HTTP requests got a 400 naming the executor's internal address, and no probe would have
restarted anything. Jina 3.34 cannot restart a Pod either: `jina flow` forks each executor once and never looks at
it again. So the gateway watches the executors itself (`ExecutorWatch`, one health check per executor address every
`interval_s`) and, once one it had seen serving stops answering:

- every health surface says so: the gateway's gRPC health (what `jina ping gateway` and the Kubernetes probes that
  `jina export kubernetes` writes ask) turns NOT_SERVING, `GET /health` and `GET /ready` answer 503;
- every request is refused without reaching for the executor: 503 with `Retry-After` over HTTP (error_code
  `unavailable`), one error document saying the engine is unavailable over gRPC and the WebSocket;
- under `jina flow` (the gateway's parent), the whole flow exits non-zero at once, so that its supervisor (systemd,
  Docker, a shell loop) starts it again: that is the simplest honest choice when nothing inside can bring the
  executor back. Elsewhere (Kubernetes, docker-compose: one process per container) the executor's container is
  restarted by its orchestrator, and the gateway reports unavailable until the executor answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.relay import StreamDocHandler
from gateway.streams import UNAVAILABLE_MESSAGE
from gateway.validation import error_response
from schemas import ErrorCode
from workarounds.jina_gateway import StreamDocRequest

log = logging.getLogger(__name__)

# What the flow's parent gets when an executor is lost. Not SIGTERM: systemd counts a death by SIGTERM as a clean
# stop and would not restart the service (Restart=on-failure); SIGUSR1's default action ends `jina flow` (which
# installs no handler for it) with a status every supervisor counts as a failure, and its children follow through
# the SIGTERM their parent's death sends them (lifecycle/).
EXIT_SIGNAL = signal.SIGUSR1


class State(enum.Enum):
    STARTING = "starting"  # not every executor has answered yet
    SERVING = "serving"
    UNAVAILABLE = "unavailable"  # an executor that had answered stopped answering


def executor_addresses(deployments_addresses: str | None) -> list[str]:
    """The gRPC addresses of every executor replica, from the gateway's `deployments_addresses` argument (JSON:
    {deployment: [address, ...]} or {deployment: {protocol: [address, ...]}})."""
    addresses: list[str] = []
    for value in json.loads(deployments_addresses or "{}").values():
        addresses.extend(value.get("grpc", []) if isinstance(value, dict) else value)
    return [address.split("://", 1)[-1] for address in addresses]


class ExecutorWatch:
    """Checks the executors' health every `interval_s` and tells `on_change` when the state changes.

    `failures`: consecutive failed checks of one executor that make it lost (a check fails at once when nobody
    listens on its port; one slow answer under load is not a death). `on_lost(address)` runs once, when an
    executor that was serving is lost.

    Between checks, a channel per executor holds a connection to it and watches its state: the moment that
    connection drops (a killed executor's kernel closes its sockets), or comes up again, the watch checks at once
    instead of at the next interval, and a dropped connection whose check fails is lost without a second failure.
    So `/ready` turns red as soon as the executor is gone, and green as soon as it is back."""

    def __init__(
        self,
        addresses: list[str],
        interval_s: float,
        retry_after_s: int,
        on_lost: Callable[[str], None] | None,
        failures: int = 2,
        timeout_s: float = 5.0,
        wait_for_servers: bool = False,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"health interval_s must be > 0, got {interval_s}")
        self.addresses = addresses
        self.interval_s = interval_s
        self.retry_after_s = retry_after_s
        self.on_lost = on_lost
        self.failures = failures
        self.timeout_s = timeout_s
        self.state = State.STARTING if addresses else State.SERVING
        self.on_change: list[Callable[[State], Any]] = []
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._dropped: set[str] = set()  # addresses whose connection dropped since the last check
        # Serving also needs the gateway's own servers listening: its HTTP server answers `/ready` while its gRPC
        # server may still wait to bind (seen after a restart: /ready 200 while the gRPC port refused).
        self._servers_listening = not wait_for_servers

    @property
    def serving(self) -> bool:
        return self.state is State.SERVING

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch())]
        self._tasks += [loop.create_task(self._watch_connection(address)) for address in self.addresses]

    async def servers_listening(self) -> None:
        """The gateway's servers are all set up (with `wait_for_servers`: serving waits for this). The callbacks
        hear the state again: Jina's gRPC server marks its health SERVING as it starts, whatever the executors'."""
        self._servers_listening = True
        await self._notify()
        self._wake.set()

    def stop(self) -> None:
        """Stop watching (the gateway is shutting down: executors going away is then expected)."""
        for task in self._tasks:
            task.cancel()

    async def _watch_connection(self, address: str) -> None:
        """Wake the checks when the connection to `address` drops or comes up. Reconnection attempts at most 1 s
        apart (grpc's default backoff grows to 2 minutes), so that a restarted executor is seen at once."""
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 1000)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            state = channel.get_state(try_to_connect=True)
            while True:
                await channel.wait_for_state_change(state)
                previous, state = state, channel.get_state(try_to_connect=True)
                ready = grpc.ChannelConnectivity.READY
                if previous is ready and state is not ready:
                    self._dropped.add(address)
                    self._wake.set()
                elif state is ready and not self.serving:
                    self._wake.set()

    async def _answers(self, address: str) -> bool:
        # A channel of its own, with its own subchannel: grpc shares subchannels between channels to the same
        # address by default, and the failed connections of these checks while the executor was still loading put
        # the one Jina's gateway uses into backoff (measured: the gateway's endpoint discovery still failed two
        # minutes after the executor listened). A fresh channel per check also sees a restarted executor at once.
        try:
            async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                request = health_pb2.HealthCheckRequest()
                response = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=self.timeout_s)
        except grpc.RpcError:  # refused, unavailable, timed out: not serving
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def _watch(self) -> None:
        await self._notify()  # the servers start out SERVING, whatever the executors' state
        failed = dict.fromkeys(self.addresses, 0)
        while True:
            answers = await asyncio.gather(*(self._answers(address) for address in self.addresses))
            dropped, self._dropped = self._dropped, set()
            for address, ok in zip(self.addresses, answers):
                # A connection that dropped and a check that fails: the executor is gone, not slow.
                failed[address] = 0 if ok else max(failed[address] + 1, self.failures if address in dropped else 0)
            lost = [address for address in self.addresses if failed[address] >= self.failures]
            if all(answers):
                if self._servers_listening:
                    await self._set(State.SERVING)
            elif lost and self.state is State.SERVING:
                log.error(f"executor at {lost[0]} stopped answering its health check: the engine is unavailable")
                await self._set(State.UNAVAILABLE)
                if self.on_lost is not None:
                    self.on_lost(lost[0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()

    async def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            await self._notify()

    async def _notify(self) -> None:
        for callback in self.on_change:
            result = callback(self.state)
            if asyncio.iscoroutine(result):
                await result


def exit_flow(address: str) -> None:
    """End the `jina flow` process that started this gateway with a failure status (see EXIT_SIGNAL)."""
    parent = multiprocessing.parent_process()
    if parent is None or os.getppid() != parent.pid:  # not under jina flow, or it has already gone
        return
    log.error(f"the executor at {address} is lost: stopping the flow so that its supervisor restarts it")
    os.kill(parent.pid, EXIT_SIGNAL)


def started_by_jina_flow() -> bool:
    return multiprocessing.parent_process() is not None


def guarded(watch: ExecutorWatch, stream_doc: StreamDocHandler) -> StreamDocHandler:
    """Wrap the gRPC handler's `stream_doc`: while the engine is unavailable, one error document (code
    unavailable) instead of a call to an executor that is not there; a stream whose executor is lost on the way
    ends with that document too, after the ones it had. Jina's handler would end such a call with an error status
    whose details name the executor's internal address (the client raises BadServerFlow), where every other
    transport sends the error document (gateway/streams.py)."""

    async def guarded_stream_doc(request: StreamDocRequest, context: Any) -> AsyncIterator[StreamDocRequest]:
        if not watch.serving:
            yield error_response(request, UNAVAILABLE_MESSAGE, ErrorCode.UNAVAILABLE)
            return
        try:
            async for response in stream_doc(request, context):
                yield response
        except Exception as error:  # not CancelledError or GeneratorExit: the client that went away gets nothing
            log.warning(f"a stream to the executor failed: {error!r}")
            yield error_response(request, UNAVAILABLE_MESSAGE, ErrorCode.UNAVAILABLE)

    return guarded_stream_doc


# HTTP ------------------------------------------------------------------------------------------------------------

# What stays open while the engine is unavailable, and without an API key: the probes and the page with its files
# under /static/ (the page reports the error, and asks for the key, itself).
OPEN_PATHS = frozenset({"/health", "/ready", "/"})
OPEN_PREFIX = "/static/"


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


RETRY_LATER = (429, 503)


def unavailable_response(retry_after_s: int) -> JSONResponse:
    error = {"message": UNAVAILABLE_MESSAGE, "type": "server_error", "param": None, "code": ErrorCode.UNAVAILABLE.value}
    return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": str(retry_after_s)})


def add_health_routes(app: FastAPI, watch: ExecutorWatch) -> None:
    """`GET /health` and `GET /ready`: 200 while every executor answers, 503 (with Retry-After) otherwise. Both
    mean the same here: the gateway process alive but without an engine serves nothing."""

    async def health() -> JSONResponse:
        if watch.serving:
            return JSONResponse({"status": watch.state.value})
        return JSONResponse(
            {"status": watch.state.value}, status_code=503, headers={"Retry-After": str(watch.retry_after_s)}
        )

    for path in ("/health", "/ready"):
        app.add_api_route(path, health, methods=["GET"], include_in_schema=False)


class RetryLater:
    """ASGI middleware: while the engine is unavailable every HTTP request but the open ones gets a 503 at once,
    without reaching for the executor; every 429 and 503 carries `Retry-After`. (Pure ASGI, not Starlette's
    BaseHTTPMiddleware, which would stand between a streaming response and the client's disconnect.)"""

    def __init__(self, app: ASGIApp, watch: ExecutorWatch) -> None:
        self.app = app
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.watch.serving and not is_open(scope["path"]):
            await unavailable_response(self.watch.retry_after_s)(scope, receive, send)
            return
        retry_after = str(self.watch.retry_after_s).encode()

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in RETRY_LATER:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", retry_after)]}
            await send(message)

        await self.app(scope, receive, send_with_retry_after)
