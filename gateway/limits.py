"""Limits on what an HTTP request may send before any route reads it (TGI has the same): the body's size and type.

- A body larger than `max_body_bytes` gets 413 naming the limit, whether it says its length (Content-Length) or
  not (chunked: counted as it arrives, and held here, at most `max_body_bytes`, until it is whole).
- A POST body that is not JSON (`Content-Type` other than application/json, e.g. the text/plain of a cross-site
  form, which a browser sends without a CORS preflight) gets 415: no cross-site page can start a generation.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 2_000_000  # TGI's payload limit


def error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class BodyLimits:
    """ASGI middleware: 413 past `max_body_bytes`, 415 for a POST body that is not JSON."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    def too_large(self) -> JSONResponse:
        message = f"the request body is larger than the limit of {self.max_body_bytes} bytes (max_body_bytes)"
        return error(413, message, "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        has_body = (length is not None and length != b"0") or b"transfer-encoding" in headers
        if scope["method"] == "POST" and has_body:
            media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if media_type != "application/json":
                shown = media_type or "none"
                message = f"send the request body as application/json (Content-Type: {shown})"
                await error(415, message, "unsupported_media_type")(scope, receive, send)
                return
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body_bytes:
                await self.too_large()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read the body here, up to the limit, then hand it on whole.
        messages: list[Message] = []
        size = 0
        while True:
            chunk = await receive()
            messages.append(chunk)
            if chunk["type"] != "http.request":
                break
            size += len(chunk.get("body", b""))
            if size > self.max_body_bytes:
                await self.too_large()(scope, receive, send)
                return
            if not chunk.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
