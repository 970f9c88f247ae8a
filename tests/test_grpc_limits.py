"""The gateway's gRPC server takes messages up to `max_grpc_message_bytes` (4 MiB by default; Jina's own default
is any size), on the real flow of the tiny model."""

from __future__ import annotations

import pytest
from jina.excepts import BadServerFlow

from gateway.gateway import DEFAULT_MAX_GRPC_MESSAGE_BYTES
from harness.service import stream_docs

MIB = 1024 * 1024


async def test_a_message_past_the_limit_is_refused_naming_the_sizes_and_others_are_served(tiny_service):
    # Under the limit the document reaches the executor, whose own prompt limit refuses it.
    (doc,) = await stream_docs(tiny_service, prompt="x" * (3 * MIB), max_tokens=2)
    assert doc.error_code == "invalid_request" and "characters; the limit is" in doc.error
    # Past it, grpc refuses the message before the gateway reads it; the client sees both sizes.
    limit = rf"RESOURCE_EXHAUSTED.*larger than max \(\d+ vs\. {DEFAULT_MAX_GRPC_MESSAGE_BYTES}\)"
    with pytest.raises(BadServerFlow, match=limit):
        await stream_docs(tiny_service, prompt="x" * (5 * MIB), max_tokens=2)
    docs = await stream_docs(tiny_service, prompt="hi", max_tokens=3)
    assert docs[-1].finish_reason == "length" and len(docs) == 3
