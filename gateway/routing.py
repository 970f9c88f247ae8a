"""Prefix-affine routing: each turn of a conversation goes to the executor replica that served its earlier turns,
whose prefix cache holds them (docs/prefix-caching.md).

Each replica keeps a prefix cache of its own, and Jina's gateway sends each stream to the next replica in turn: with
2 replicas, a conversation's next turn often found none of its history where it landed (BENCHMARKS.md, "Several
replicas").

- The key is what every turn of a conversation resends unchanged from its beginning. Chat messages: the system
  messages and the first message after them (the conversation's opening question). The system prompt alone is the
  same in every conversation of an application: as the key it would send them all to one replica. A text prompt:
  its first TEXT_KEY_CHARS characters, which a chat template's system turn and first question usually fill (a
  shorter first prompt is a key of its own, and its next turn may go elsewhere).
- The replica is the key's first by rendezvous hashing (highest random weight) of the key with each replica's
  address: no state, so every gateway picks the same one, and a replica added or lost moves only the keys it wins
  or held.
- A replica that refuses the stream before its first token, because it is full (`overloaded`), stopping
  (`shutdown`) or without an engine (`unavailable`), gets the stream sent to the key's next replica; once every
  replica has refused, the last refusal is the answer. A replica that cannot be reached: Jina's own retry asks for
  another connection and gets the key's next replica (workarounds/jina_routing.py).

Every transport's stream to the executor (gRPC `stream_doc`, SSE, the OpenAI API, the WebSocket, `/generate`, the
predictions) is one call of the streamer's `rpc_stream_doc`, which `prefix_affine` wraps (gateway/gateway.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from gateway.streams import STREAM_ENDPOINT
from schemas import ErrorCode, PromptDocument
from workarounds import jina_routing
from workarounds.jina_gateway import StreamDocRequest, document_value, request_document, request_endpoint

TEXT_KEY_CHARS = 256
# What a replica answers at once, before any token, when another replica may well serve the stream.
REFUSALS = frozenset({ErrorCode.OVERLOADED.value, ErrorCode.SHUTDOWN.value, ErrorCode.UNAVAILABLE.value})

StreamCall = Callable[..., AsyncGenerator[StreamDocRequest, None]]

log = logging.getLogger(__name__)


def affinity_key(prompt: PromptDocument) -> bytes | None:
    """What picks the prompt's replica: the same for every turn of one conversation. None: no prompt at all."""
    if prompt.messages:
        opening = []
        for message in prompt.messages:
            opening.append(f"{message.role}\0{message.content}")
            if message.role != "system":
                break
        text = "\0".join(["messages", *opening])
    elif prompt.prompt is not None:
        text = "prompt\0" + prompt.prompt[:TEXT_KEY_CHARS]
    else:
        return None
    return text.encode("utf-8", "surrogatepass")


class Route:
    """The replicas one stream goes to, in its key's order: each time Jina asks, the next one not yet named (all
    named: the first again)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._named: set[str] = set()
        self._replicas = 0

    def _weight(self, address: str) -> bytes:
        return hashlib.blake2b(self._key + b"\0" + address.encode(), digest_size=8).digest()

    def choose(self, addresses: Sequence[str]) -> str:
        self._replicas = len(addresses)
        ranked = sorted(addresses, key=self._weight, reverse=True)
        choice = next((address for address in ranked if address not in self._named), ranked[0])
        self._named.add(choice)
        return choice

    @property
    def untried(self) -> bool:
        """Whether a replica remains that this stream has not been sent to."""
        return len(self._named) < self._replicas


def route_of(request: StreamDocRequest) -> Route | None:
    """The route of a request to the streaming endpoint (whose document the gateway has validated), else None."""
    if request_endpoint(request) != STREAM_ENDPOINT:
        return None
    key = affinity_key(PromptDocument.from_protobuf(request_document(request)))
    return None if key is None else Route(key)


def refused(response: StreamDocRequest) -> bool:
    return document_value(request_document(response), "error_code") in REFUSALS


def prefix_affine(rpc_stream_doc: StreamCall) -> StreamCall:
    """Wrap the streamer's `rpc_stream_doc` (called with `request=`): a stream to the streaming endpoint goes to its
    key's replica, and on to the next when a replica refuses it; everything else goes as Jina sends it."""

    def affine_stream_doc(request: StreamDocRequest, **kwargs: Any) -> AsyncGenerator[StreamDocRequest, None]:
        route = route_of(request)
        if route is None:
            return rpc_stream_doc(request=request, **kwargs)
        return _routed(route, lambda: rpc_stream_doc(request=request, **kwargs))

    return affine_stream_doc


async def _routed(
    route: Route, send: Callable[[], AsyncGenerator[StreamDocRequest, None]]
) -> AsyncGenerator[StreamDocRequest, None]:
    while True:
        responses = jina_routing.routed(send(), route.choose)
        try:
            first = await anext(responses, None)
            if first is not None and refused(first) and route.untried:
                log.info("a replica refused a stream before its first token: sending it to the next one")
                continue
            if first is None:
                return
            yield first
            async for response in responses:
                yield response
            return
        finally:
            await responses.aclose()
