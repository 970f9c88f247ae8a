"""What the gateway's connection limits (gateway/limits.py) need of uvicorn's protocol classes, which Jina's HTTP
gateway runs (through its `uvicorn_kwargs`, which take a protocol class for `http` and `ws`).

- Bounded reading (slowloris, slow bodies, huge heads): uvicorn 0.23's h11 protocol times neither a request's
  headers nor its body. Its keep-alive timeout only runs while a connection is idle between requests, and the
  first byte of a request cancels it, so a client that trickles a request a byte at a time holds its connection
  (and its buffer) for good. Nor does it bound the head: h11's `max_incomplete_event_size` applies only to a head
  still incomplete, so 10,000 headers sent in one write were all read. `bounded_reading_protocol` subclasses
  uvicorn's H11Protocol: a header timer starts when the connection opens and when a response is complete (the
  next request's turn), and stops once h11 has read the request line and every header (the client's h11 state
  leaves IDLE); the head's bytes and lines are counted as they arrive, before h11 parses them; then, while h11
  reads a body (SEND_BODY), a body timer fires after `body_timeout_s` without a byte, or once the body's average
  rate falls below `min_body_rate` (mod_reqtimeout's MinRate). Each bound writes its response (408 or 431) and
  closes the connection. The WebSocket after its upgrade and streaming responses are not timed.
- The WebSocket message limit's reason: uvicorn passes its `ws_max_size` to websockets' (legacy) protocol, which
  closes a connection whose message is larger with 1009 (message too big) and an empty reason.
  `message_limit_protocol` subclasses uvicorn's WebSocketProtocol so that this close carries a reason naming the
  limit (its `fail_connection` fills in the reason of a 1009 that has none).
tests/test_security.py and tests/test_attacks.py prove them on a real flow.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol
from websockets.frames import CloseCode

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"uvicorn": ("0.23",), "h11": ("0.16",), "websockets": ("17",)}
TEST = "tests/test_security.py tests/test_limits.py tests/test_attacks.py"


def install() -> None:
    """Check that these uvicorn, h11 and websockets are the ones these classes were verified on."""
    require_verified(__name__, VERIFIED, TEST)


@dataclass(frozen=True)
class ReadingBounds:
    """How long and how large a request's head and body may be, and the whole HTTP response (a 408 or a 431) each
    bound answers with before the connection is closed."""

    header_timeout_s: float
    body_timeout_s: float  # the longest pause between two pieces of a body
    min_body_rate: float  # bytes a second, on average over the body, after its first `body_timeout_s`
    max_header_count: int
    max_header_bytes: int  # the request line and every header, as sent
    header_timeout: bytes
    body_timeout: bytes
    too_many_headers: bytes
    headers_too_large: bytes


HEAD_END = b"\r\n\r\n"
# After a refusal, how long the connection still reads (and drops) what the client sends before it closes: a socket
# closed with unread input sends a reset, which can destroy the answer before the client has read it (the
# lingering close of Apache and nginx).
LINGER_S = 2.0


def bounded_reading_protocol(bounds: ReadingBounds) -> type[H11Protocol]:
    """uvicorn's h11 protocol, bounding how a request is read (this module's docstring): each bound writes its
    response and closes the connection."""

    class BoundedReadingProtocol(H11Protocol):
        timer: asyncio.TimerHandle | None = None
        head_bytes = 0  # of the request head under way
        head_lines = 0
        head_tail = b""  # its last bytes, to see the blank line that ends it across two reads
        body_started = 0.0  # loop time the body's reading began
        body_bytes = 0
        body_progress = 0.0  # loop time of its last piece
        refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.expect_head()

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            if self.conn.their_state is h11.IDLE and self.head_over_bounds(data):
                return
            if self.timer is not None and self.conn.their_state is h11.SEND_BODY:
                self.body_bytes += len(data)
                self.body_progress = self.loop.time()
            super().data_received(data)
            if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: the socket is not ours to time
                self.disarm()  # (h11 still reads the upgrade request as a body under way, which never ends)
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self.body_started == 0.0:
                    self.expect_body()
            elif state is not h11.IDLE:  # the request is whole (or the connection is upgraded)
                self.disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.expect_head()  # the next request's

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def expect_head(self) -> None:
            self.head_bytes = self.head_lines = 0
            self.head_tail = b""
            self.body_started = 0.0
            self.arm(bounds.header_timeout_s, self.head_too_slow)

        def expect_body(self) -> None:
            self.body_started = self.body_progress = self.loop.time()
            self.body_bytes = 0
            self.arm(bounds.body_timeout_s, self.check_body)

        def arm(self, delay_s: float, callback) -> None:
            self.disarm()
            self.timer = self.loop.call_later(delay_s, callback)

        def disarm(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def head_over_bounds(self, data: bytes) -> bool:
            """Count the head's bytes and lines in `data` (up to its blank line); past a bound, answer 431."""
            seen = self.head_tail + data
            end = seen.find(HEAD_END)
            head = data if end < 0 else data[: max(0, end + len(HEAD_END) - len(self.head_tail))]
            self.head_tail = seen[-(len(HEAD_END) - 1):]
            self.head_bytes += len(head)
            self.head_lines += head.count(b"\n")
            # Lines: the request line, one a header, and the blank line once the head is whole.
            headers = self.head_lines - 1 - (end >= 0)
            if headers > bounds.max_header_count:
                self.refuse(bounds.too_many_headers)
                return True
            if self.head_bytes > bounds.max_header_bytes:
                self.refuse(bounds.headers_too_large)
                return True
            return False

        def head_too_slow(self) -> None:
            self.timer = None
            if self.conn.their_state is h11.IDLE:
                self.refuse(bounds.header_timeout)

        def check_body(self) -> None:
            """A body that paused longer than `body_timeout_s`, or whose average rate fell below `min_body_rate`
            after its first `body_timeout_s`, gets the 408. A body the server has stopped reading (uvicorn's
            flow control, while the route has not taken what came) is not the client's delay."""
            self.timer = None
            if self.conn.their_state is not h11.SEND_BODY:
                return
            now = self.loop.time()
            if self.flow.read_paused:
                self.body_progress = now
            rate_deadline = self.body_started + bounds.body_timeout_s + self.body_bytes / bounds.min_body_rate
            deadline = min(self.body_progress + bounds.body_timeout_s, rate_deadline)
            if now < deadline:
                self.arm(deadline - now, self.check_body)
                return
            # A response under way (a route that answered before reading the body) is cut short instead.
            self.refuse(bounds.body_timeout if self.conn.our_state is h11.SEND_RESPONSE else b"")

        def refuse(self, response: bytes) -> None:
            self.disarm()
            if self.refused or self.transport.is_closing():
                return
            self.refused = True
            # Written past h11, which cannot send a response before it has read a whole request; then the end of
            # what the server sends, and a close once the client has closed too, or after LINGER_S.
            self.transport.write(response)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.timer = self.loop.call_later(LINGER_S, self.transport.close)

    return BoundedReadingProtocol


def message_limit_protocol(too_big_reason: str) -> type[WebSocketProtocol]:
    """uvicorn's WebSocket protocol whose close for a message past `ws_max_size` says `too_big_reason`."""

    class MessageLimitProtocol(WebSocketProtocol):
        def fail_connection(self, code: int = CloseCode.ABNORMAL_CLOSURE, reason: str = "") -> Any:
            if code == CloseCode.MESSAGE_TOO_BIG and not reason:
                reason = too_big_reason
            return super().fail_connection(code, reason)

    return MessageLimitProtocol
