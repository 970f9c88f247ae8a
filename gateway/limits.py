"""Limits on what a client may send, checked before any route reads it (TGI has the same), each a setting of the
gateway (`LLMGateway`'s `uses_with`) whose error names it:

- `max_body_bytes`: a larger HTTP body gets 413, whether it says its length (Content-Length) or not (chunked:
  counted as it arrives).
- A POST body that is not JSON (`Content-Type` other than application/json, e.g. the text/plain of a cross-site
  form, which a browser sends without a CORS preflight) gets 415: no cross-site page can start a generation.
- `max_json_depth`: a body (or a JSON value in `/stream`'s query, or a WebSocket message) that nests arrays and
  objects deeper gets 400. Python's parser fails on deep nesting with RecursionError, which a route would answer
  with a 500; nothing the service reads needs more than a few levels.
- `max_ws_message_bytes`: a larger WebSocket message closes the connection with 1009 (message too big) and a reason
  naming the limit; as large as an HTTP body by default, so that a prompt that fits one fits the other.
- `header_timeout_s`: a connection whose request line and headers are not whole this long after it opened (or
  after its previous response) gets 408 and is closed, so that clients trickling headers (slowloris) cannot hold
  connections open.
- `body_timeout_s`, `min_body_rate`: a body that pauses longer than `body_timeout_s`, or arrives slower on
  average than `min_body_rate` bytes a second once `body_timeout_s` has passed, gets 408 and the connection is
  closed: a client trickling a body cannot hold a connection either.
- `max_header_count`, `max_header_bytes`: a request head with more headers, or more bytes (request line and
  headers), gets 431 and the connection is closed.
The last three live in the protocol classes given to uvicorn (workarounds/uvicorn_protocols.py).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workarounds import uvicorn_protocols

DEFAULT_MAX_BODY_BYTES = 2_000_000  # TGI's payload limit
DEFAULT_MAX_JSON_DEPTH = 64  # OpenAI's requests nest 5 levels deep
DEFAULT_MAX_WS_MESSAGE_BYTES = DEFAULT_MAX_BODY_BYTES
DEFAULT_HEADER_TIMEOUT_S = 10.0  # Apache's mod_reqtimeout allows 20-40 s, growing with the bytes received
DEFAULT_BODY_TIMEOUT_S = 5.0  # a client that has sent its head has its body ready; mod_reqtimeout allows 20 s
DEFAULT_MIN_BODY_RATE = 500.0  # bytes a second: mod_reqtimeout's MinRate; a body at the size limit gets 67 min
DEFAULT_MAX_HEADER_COUNT = 100  # Apache's LimitRequestFields
# The request line counts too, and a browser's EventSource sends a whole conversation in `/stream`'s query: larger
# than nginx's 4 x 8 KiB header buffers.
DEFAULT_MAX_HEADER_BYTES = 256 * 1024
# Bodies larger than this have their nesting measured in a worker thread (about 40 ms per MB), off the event loop.
INLINE_DEPTH_BYTES = 64 * 1024


def error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, code), status_code=status)


@dataclass(frozen=True)
class HttpLimits:
    """The gateway's limits on what a client sends (this module's docstring)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_ws_message_bytes: int = DEFAULT_MAX_WS_MESSAGE_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    min_body_rate: float = DEFAULT_MIN_BODY_RATE
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __post_init__(self) -> None:  # a wrong setting fails the gateway's start, naming it
        for field in fields(self):
            name, value = field.name, getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")

    def too_deep(self, where: str) -> str:
        limit = self.max_json_depth
        return f"{where} nests arrays and objects deeper than the limit of {limit} levels (max_json_depth)"

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """The settings of uvicorn, the server Jina's HTTP gateway runs, that hold the connection limits."""
        uvicorn_protocols.install()
        bounds = uvicorn_protocols.ReadingBounds(
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            min_body_rate=self.min_body_rate,
            max_header_count=self.max_header_count,
            max_header_bytes=self.max_header_bytes,
            header_timeout=raw_error(408, "Request Timeout", "request_timeout", "the request headers took longer than "
                                     f"the limit of {self.header_timeout_s:g} s (header_timeout_s)"),
            body_timeout=raw_error(408, "Request Timeout", "request_timeout", "the request body paused longer than "
                                   f"{self.body_timeout_s:g} s (body_timeout_s) or arrived slower than "
                                   f"{self.min_body_rate:g} bytes/s (min_body_rate)"),
            too_many_headers=raw_error(431, "Request Header Fields Too Large", "request_header_fields_too_large",
                                       f"the request has more headers than the limit of {self.max_header_count} "
                                       "(max_header_count)"),
            headers_too_large=raw_error(431, "Request Header Fields Too Large", "request_header_fields_too_large",
                                        f"the request line and headers are larger than the limit of "
                                        f"{self.max_header_bytes} bytes (max_header_bytes)"),
        )
        reason = f"message larger than the limit of {self.max_ws_message_bytes} bytes (max_ws_message_bytes)"
        return {
            "http": uvicorn_protocols.bounded_reading_protocol(bounds),
            # h11's own bound on a head still incomplete (16 KiB by default) would answer a plain 400 first.
            "h11_max_incomplete_event_size": self.max_header_bytes + 1,
            "ws": uvicorn_protocols.message_limit_protocol(reason),
            "ws_max_size": self.max_ws_message_bytes,
        }


def raw_error(status: int, phrase: str, code: str, message: str) -> bytes:
    """A whole HTTP response carrying the error JSON, for the protocol to write past h11 before it closes."""
    body = json.dumps(error_body(message, code)).encode()
    head = f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head.encode() + b"content-length: %d\r\n\r\n%s" % (len(body), body)


# JSON nesting -----------------------------------------------------------------------------------------------------

STEPS = np.zeros(256, np.int8)  # what each byte does to the nesting depth outside strings
STEPS[list(b"[{")] = 1
STEPS[list(b"]}")] = -1
QUOTE, BACKSLASH = ord('"'), ord("\\")


def json_depth(data: bytes) -> int:
    """How deep arrays and objects nest in the JSON text `data` (brackets inside strings do not count), in numpy:
    a loop over the bytes in Python would take a second for a body at the size limit."""
    codes = np.frombuffer(data, np.uint8)
    steps = STEPS[codes]
    quotes = codes == QUOTE
    backslashes = codes == BACKSLASH
    if backslashes.any():  # a quote after an odd run of backslashes is inside its string
        positions = np.arange(len(codes))
        last_other = np.maximum.accumulate(np.where(backslashes, -1, positions))  # the last non-backslash so far
        run_before = np.zeros(len(codes), np.int64)
        run_before[1:] = positions[:-1] - last_other[:-1]
        quotes &= run_before % 2 == 0
    inside_string = np.cumsum(quotes, dtype=np.int64) % 2 == 1
    return int(np.cumsum(np.where(inside_string, 0, steps), dtype=np.int64).max(initial=0))


def deeper_than(data: bytes, max_depth: int) -> bool:
    # Fewer opening brackets than the limit cannot nest past it: most bodies are decided by two counts.
    return data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth


async def nests_deeper_than(data: bytes, max_depth: int) -> bool:
    if len(data) <= INLINE_DEPTH_BYTES:
        return deeper_than(data, max_depth)
    return await asyncio.to_thread(deeper_than, data, max_depth)


class JsonError(ValueError):
    """Text that is not JSON, or nests deeper than the limit: the message says which."""


async def parse_json(text: str | bytes, limits: HttpLimits, what: str) -> Any:
    """`text` parsed as JSON, or JsonError naming `what` and the problem (`max_json_depth` when it nests too deep)."""
    data = text.encode() if isinstance(text, str) else text
    if await nests_deeper_than(data, limits.max_json_depth):
        raise JsonError(limits.too_deep(what))
    try:
        return json.loads(data)
    except ValueError as problem:  # JSONDecodeError, or bytes that are not UTF-8
        raise JsonError(f"{what} is not valid JSON: {problem}") from None


# The middleware ---------------------------------------------------------------------------------------------------


class BodyLimits:
    """ASGI middleware: 413 past `max_body_bytes`, 415 for a POST body that is not JSON, 400 for a body nested
    deeper than `max_json_depth`."""

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits

    def too_large(self) -> JSONResponse:
        limit = self.limits.max_body_bytes
        message = f"the request body is larger than the limit of {limit} bytes (max_body_bytes)"
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
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            await self.too_large()(scope, receive, send)
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        # Read the body here, up to the limit (a chunked one says no length), to check its nesting before a
        # route parses it; then hand it on whole.
        chunks: list[bytes] = []
        size = 0
        while True:
            received = await receive()
            if received["type"] != "http.request":
                return  # the client left before its body was whole: nobody to answer
            chunks.append(received.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body_bytes:
                await self.too_large()(scope, receive, send)
                return
            if not received.get("more_body", False):
                break
        body = b"".join(chunks)
        if await nests_deeper_than(body, self.limits.max_json_depth):
            await error(400, self.limits.too_deep("the request body"), "invalid_json")(scope, receive, send)
            return
        whole: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)
