"""Which web pages may drive the service from a visitor's browser.

A browser lets any page open a WebSocket to any host, and sends the page's `Origin` with the handshake: without a
check, a hostile page could start generations through its visitors' browsers (and with them, their network
position). `/ws` accepts a handshake whose `Origin` is the service's own (the same host and port as the request's
`Host`), one of the `allowed_origins`, or none at all (a client that is not a browser). CORS for the HTTP API is
off unless `allowed_origins` names origins: then Starlette's CORSMiddleware answers for them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send


def same_host(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port]) names `host` (the request's Host header, host[:port])."""
    parts = urlsplit(origin)
    netloc = parts.netloc.lower()
    default_port = {"http": "80", "https": "443"}.get(parts.scheme)
    host = host.lower()
    return netloc == host or (default_port is not None and f"{netloc}:{default_port}" == host)


class OriginCheck:
    """ASGI middleware: refuse a WebSocket handshake from a page of another origin (closed before it is accepted,
    which the server answers with 403)."""

    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            headers = dict(scope.get("headers", []))
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin and origin not in self.allowed_origins and not same_host(origin, host):
                await send({"type": "websocket.close", "code": 1008, "reason": f"origin {origin} is not allowed"})
                return
        await self.app(scope, receive, send)
