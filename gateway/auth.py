"""API keys: `LLM_API_KEY` (one key, or several separated by commas) or `LLM_API_KEY_FILE` (a file of keys, one a
line or comma-separated), read when the gateway starts.

With keys, every route needs `Authorization: Bearer <key>`: HTTP answers 401 in OpenAI's error JSON without it,
the WebSocket `/ws` also takes the key as `?api_key=` (a browser's WebSocket cannot set headers) and refuses the
handshake without it, and every gRPC call but the health check needs `authorization: Bearer <key>` in its metadata
(`Client.stream_doc(..., metadata=(("authorization", "Bearer <key>"),))`) and otherwise ends with UNAUTHENTICATED,
which Jina's client raises as BadServerFlow naming the status. The probes (`/health`, `/ready`, gRPC health) and
the page at `/` (which asks for the key) with its files under `/static/` stay open. Without keys the service is
open, as before, and says so in its start-up log. Keys are compared in constant time (hmac.compare_digest,
against every key).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import grpc
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.health import is_open

KEY_ENV = "LLM_API_KEY"
KEY_FILE_ENV = "LLM_API_KEY_FILE"
QUERY_PARAMETER = "api_key"
MISSING_KEY = "missing or invalid API key: send `Authorization: Bearer <key>` (a header; gRPC: call metadata)"
# gRPC calls that stay open: the probes' health checks and reflection.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def split_keys(text: str) -> list[str]:
    return [key.strip() for line in text.splitlines() for key in line.split(",") if key.strip()]


def load_keys(environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """The keys the environment names; none when neither variable is set. A key file that cannot be read, or
    names no key, fails the start: a service meant to be closed must not come up open."""
    environ = dict(os.environ) if environ is None else environ
    keys = split_keys(environ.get(KEY_ENV, ""))
    if path := environ.get(KEY_FILE_ENV):
        file_keys = split_keys(Path(path).read_text())
        if not file_keys:
            raise ValueError(f"{KEY_FILE_ENV}={path} holds no API key")
        keys.extend(file_keys)
    return tuple(key.encode() for key in keys)


class Keys:
    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self.keys = keys

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def accepts(self, key: str | bytes | None) -> bool:
        """Whether `key` is one of the keys, in time independent of which key matched and where it differs."""
        if not self.keys:
            return True
        given = (key.encode() if isinstance(key, str) else key) or b""
        matched = False
        for known in self.keys:  # every key, always: no early exit to time
            matched |= hmac.compare_digest(given, known)
        return matched

    def accepts_authorization(self, header: str | bytes | None) -> bool:
        """`Authorization: Bearer <key>`."""
        value = (header.decode("latin-1") if isinstance(header, bytes) else header) or ""
        scheme, _, key = value.partition(" ")
        return self.accepts(key.strip() if scheme.lower() == "bearer" else None)

    def log_mode(self, logger: Any) -> None:
        """Say at start whether the service is closed or open (`logger`: the gateway's)."""
        if self.required:
            logger.warning(f"API keys required on every route but the probes ({len(self.keys)} key(s) loaded)")
        else:
            logger.warning(f"no API key ({KEY_ENV} or {KEY_FILE_ENV}): every route is OPEN to anyone who reaches it")


def unauthorized_response() -> JSONResponse:
    error = {"message": MISSING_KEY, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    return JSONResponse({"error": error}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class RequireKey:
    """ASGI middleware: HTTP requests and WebSocket handshakes without a valid key are refused (HTTP 401; a
    WebSocket handshake is closed before it is accepted, which the server answers with 403)."""

    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys.required or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        ok = self.keys.accepts_authorization(headers.get(b"authorization"))
        if not ok and scope["type"] == "websocket":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            ok = self.keys.accepts(query.get(QUERY_PARAMETER, [None])[0])
        if ok:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": MISSING_KEY})
        else:
            await unauthorized_response()(scope, receive, send)


class GrpcKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every gRPC call but the open ones needs `authorization: Bearer <key>` in its metadata, else UNAUTHENTICATED."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.keys.required or method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.keys.accepts_authorization(metadata.get("authorization")):
            return handler
        return refusing(handler)


def refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **serializers)
    return grpc.unary_unary_rpc_method_handler(abort, **serializers)
