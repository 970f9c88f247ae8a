"""The access log: one line per request on the logger `llm.access`, for every protocol the gateway serves.

HTTP requests (the OpenAI API, `GET /stream`, `POST /generate`, `/v1/predictions`, every other route) get their
line from `AccessLog`, an ASGI middleware outside all others, so refusals (401, 413, 503) are logged too; a
WebSocket connection gets one when it closes, and each of its turns one of its own. gRPC `stream_doc` gets one from
`access_logged`, the outermost wrapper of its handler. A line reads

    request_id=3f2a... protocol=http method=POST route=/v1/chat/completions status=200 finish_reason=length
    error_code=- prompt_tokens=9 completion_tokens=16 ttft_ms=41.7 duration_ms=212.0

(on one line): `status` is the HTTP status (101 for an accepted WebSocket, the gRPC status code's name for gRPC),
`finish_reason` and `error_code` those of the generation's last document (`cancelled` when the gateway cancelled
it because its client left), tokens as the executor counted them, `ttft_ms` from the request's arrival at the
gateway to its first token there. `-` is what is not known or does not apply.

The request id is the client's `X-Request-Id` header (gRPC: `x-request-id` metadata) when it is a token of at most
MAX_REQUEST_ID_LENGTH characters (letters, digits and ``!#$%&'*+-.^_`|~``, as an HTTP token), else a fresh one; it
is echoed in the response's `X-Request-Id` header (gRPC: initial metadata; a WebSocket: the handshake's answer).

Documents reach a request's record through a context variable: the middleware sets it, and the tasks the routes
start to read the executor's stream (gateway/streams.py) inherit it, so `ObservedStreamer` finds the record of
the request whose stream it relays. The line is formatted on the event loop (a few microseconds) and written by a
thread: the event loop never waits on the log's file.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import itertools
import json
import logging
import logging.handlers
import queue
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, TextIO

from gateway.relay import StreamDocHandler
from workarounds.jina_gateway import StreamDocRequest, document_value, request_document, request_endpoint

log = logging.getLogger("llm.access")

REQUEST_ID_HEADER = "x-request-id"
_HEADER = REQUEST_ID_HEADER.encode()
MAX_REQUEST_ID_LENGTH = 128
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110's tchar: nothing that can break a log line
_BARE_VALUE = re.compile(r"[\x21-\x7e]+")  # printable ASCII: written as it is unless it holds a quote

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def request_id(given: str | None) -> str:
    """The client's request id when it is a short token, else a fresh one."""
    if given is not None and len(given) <= MAX_REQUEST_ID_LENGTH and _TOKEN.fullmatch(given):
        return given
    return uuid.uuid4().hex


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    # A path or a client's value may hold spaces, quotes or a newline: JSON-quoted, it stays one field of one line.
    return text if _BARE_VALUE.fullmatch(text) and '"' not in text else json.dumps(text)


class AccessRecord:
    """What one request's line says; `observe` takes each document of its generations as the gateway relays it."""

    def __init__(self, request_id: str, protocol: str, method: str, route: str) -> None:
        self.request_id, self.protocol, self.method, self.route = request_id, protocol, method, route
        self.started = time.perf_counter()
        self.status: int | str | None = None
        self.finish_reason: str | None = None
        self.error_code: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.first_token_at: float | None = None
        self.logged = False
        self._turns = itertools.count(1)

    def observe(
        self,
        token_id: int | None,
        finish_reason: str | None,
        error_code: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """One document of a generation of this request (`POST /generate` relays several: their tokens add up,
        the first error code stays)."""
        if self.logged:  # a generation that outlives its request (a prediction's): its own record is the store's
            return
        if self.first_token_at is None and token_id is not None and token_id >= 0:
            self.first_token_at = time.perf_counter()
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.error_code = self.error_code or error_code
            self.prompt_tokens = _add(self.prompt_tokens, prompt_tokens)
            self.completion_tokens = _add(self.completion_tokens, completion_tokens)

    def observe_doc(self, doc: Any) -> None:
        """A ModelOutputDocument (or a document with its fields) from the executor."""
        self.observe(*(getattr(doc, name, None) for name in _FIELDS))

    def cancelled(self) -> None:
        """The gateway cancelled the generation before its last document: its client left or cancelled it."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def turn(self) -> AccessRecord:
        """A record for one turn of a WebSocket connection, numbered after the connection's request id."""
        return AccessRecord(f"{self.request_id}.{next(self._turns)}", self.protocol, "turn", self.route)

    def write(self) -> None:
        """Log the line, once."""
        if self.logged:
            return
        self.logged = True
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else (self.first_token_at - self.started) * 1000
        fields = {
            "request_id": self.request_id,
            "protocol": self.protocol,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "error_code": self.error_code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": ttft,
            "duration_ms": (now - self.started) * 1000,
        }
        log.info(" ".join(f"{key}={_value(value)}" for key, value in fields.items()))


_FIELDS = ("token_id", "finish_reason", "error_code", "prompt_tokens", "completion_tokens")


def _add(total: int | None, count: int | None) -> int | None:
    return total if count is None else (total or 0) + count


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("access_record", default=None)


class AccessLog:
    """ASGI middleware: the line of every HTTP request and WebSocket connection, and the `X-Request-Id` echo.
    Pure ASGI (not Starlette's BaseHTTPMiddleware, which buffers streaming bodies through a queue of its own)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == _HEADER), None)
        websocket = scope["type"] == "websocket"
        record = AccessRecord(
            request_id(given), "ws" if websocket else "http", "GET" if websocket else scope["method"], scope["path"]
        )
        echo = (_HEADER, record.request_id.encode())

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), echo]}
            elif kind == "websocket.accept":
                record.status = 101
                message = {**message, "headers": [*message.get("headers", ()), echo]}
            elif kind == "websocket.close" and record.status is None:  # refused before the handshake's answer
                record.status = 403
            await send(message)

        reset = _current.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if record.status is None:  # Starlette's outermost middleware answers it with a 500
                record.status = 500
            raise
        finally:
            _current.reset(reset)
            record.write()


class ObservedStreamer:
    """The HTTP routes' streamer (Jina's GatewayStreamer): each generation's documents go to the record of the
    request being served (a WebSocket turn's to a record of its own, logged when the turn ends). Everything but
    `stream_doc` is the streamer's own."""

    def __init__(self, streamer: Any) -> None:
        self._streamer = streamer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._streamer, name)

    async def stream_doc(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        request = _current.get()
        record = None if request is None else request.turn() if request.protocol == "ws" else request
        try:
            async for doc, error in self._streamer.stream_doc(*args, **kwargs):
                if record is not None and doc is not None:
                    record.observe_doc(doc)
                    if record is not request and record.finish_reason is not None:
                        record.write()  # the turn's last document: the connection goes on
                yield doc, error
        except (asyncio.CancelledError, GeneratorExit):
            if record is not None:
                record.cancelled()
            raise
        finally:
            if record is not None and record is not request:
                record.write()


def access_logged(stream_doc: StreamDocHandler) -> StreamDocHandler:
    """Wrap the gRPC request handler's `stream_doc`: a line per call, once it has ended, with the `x-request-id`
    it took from the call's metadata (or made) sent back in the initial metadata."""

    async def logged_stream_doc(request: StreamDocRequest, context: Any) -> AsyncIterator[StreamDocRequest]:
        metadata = dict(context.invocation_metadata() or ()) if context is not None else {}
        record = AccessRecord(
            request_id(metadata.get(REQUEST_ID_HEADER)), "grpc", "stream_doc", request_endpoint(request)
        )
        if context is not None:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, record.request_id),))
        record.status = "OK"
        try:
            async for response in stream_doc(request, context):
                record.observe(*proto_fields(response))
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            record.status = "CANCELLED"
            record.cancelled()
            raise
        except Exception:  # grpc answers it with UNKNOWN
            record.status = "UNKNOWN"
            raise
        finally:
            record.write()

    return logged_stream_doc


def proto_fields(response: StreamDocRequest) -> list[Any]:
    """The fields `AccessRecord.observe` takes, read from the response's protobuf document (parsing the whole
    document into pydantic, for every token, would cost far more)."""
    document = request_document(response)
    return [document_value(document, name) for name in _FIELDS]


def install(stream: TextIO = sys.stdout) -> None:
    """Write `llm.access` at INFO to `stream` through a thread of its own, unless the logger has handlers already
    (a logging configuration routes it; setting its level to WARNING silences it)."""
    if log.handlers:
        return
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    listener = logging.handlers.QueueListener(lines, handler)
    listener.start()
    atexit.register(listener.stop)  # writes out the lines still queued
    log.addHandler(logging.handlers.QueueHandler(lines))
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False  # one line, not a second through a root handler
