"""What the gateway's connection limits (gateway/limits.py) need of uvicorn's protocol classes, which Jina's HTTP
gateway runs (through its `uvicorn_kwargs`, which take a protocol class for `http` and `ws`).

- A header deadline (slowloris): uvicorn 0.23's h11 protocol never times a request's headers. Its keep-alive
  timeout only runs while a connection is idle between requests, and the first byte of a request cancels it, so
  a client that trickles a request's headers a byte at a time holds its connection (and its buffer) for good.
  `header_deadline_protocol` subclasses uvicorn's H11Protocol: a timer starts when the connection opens and when
  a response is complete (the next request's turn), and stops as soon as h11 has read the request line and every
  header (the client's h11 state leaves IDLE); if it fires first, the connection gets the given response (a 408)
  and is closed. The body, the WebSocket after its upgrade and streaming responses are not timed.
- The WebSocket message limit's reason: uvicorn passes its `ws_max_size` to websockets' (legacy) protocol, which
  closes a connection whose message is larger with 1009 (message too big) and an empty reason.
  `message_limit_protocol` subclasses uvicorn's WebSocketProtocol so that this close carries a reason naming the
  limit (its `fail_connection` fills in the reason of a 1009 that has none).
tests/test_security.py proves both on a real flow.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol
from websockets.frames import CloseCode

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"uvicorn": ("0.23",), "h11": ("0.16",), "websockets": ("17",)}
TEST = "tests/test_security.py tests/test_limits.py"


def install() -> None:
    """Check that these uvicorn, h11 and websockets are the ones these classes were verified on."""
    require_verified(__name__, VERIFIED, TEST)


def header_deadline_protocol(timeout_s: float, response: bytes) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not whole within `timeout_s` of
    its opening (or of the previous response's end), after writing `response` (a whole HTTP response)."""

    class HeaderDeadlineProtocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection is upgraded)
                self.disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.arm_header_timer()  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_header_timer()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            self.disarm_header_timer()
            self.header_timer = self.loop.call_later(timeout_s, self.headers_too_slow)

        def disarm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                # Written past h11, which cannot send a response before it has read a request.
                self.transport.write(response)
                self.transport.close()

    return HeaderDeadlineProtocol


def message_limit_protocol(too_big_reason: str) -> type[WebSocketProtocol]:
    """uvicorn's WebSocket protocol whose close for a message past `ws_max_size` says `too_big_reason`."""

    class MessageLimitProtocol(WebSocketProtocol):
        def fail_connection(self, code: int = CloseCode.ABNORMAL_CLOSURE, reason: str = "") -> Any:
            if code == CloseCode.MESSAGE_TOO_BIG and not reason:
                reason = too_big_reason
            return super().fail_connection(code, reason)

    return MessageLimitProtocol
