"""gRPC `stream_doc`: a document that is not a valid PromptDocument gets one error document from the gateway.

Jina's client sends the document's fields without its class, so a client with a schema of its own (no `prompt`,
or a `max_tokens` of another type) reaches the executor's Jina worker, which fails to read it as a PromptDocument
before the executor runs. The gateway takes that gRPC error for a broken connection, retries, and ends the
client's stream with nothing. So the gateway reads the document as the executor will, and answers one that does
not pass with a last document with finish_reason='error' that names the fields at fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic.typing import display_as_type

from gateway.encodable import unencodable
from gateway.relay import StreamDocHandler
from gateway.streams import STREAM_ENDPOINT
from schemas import ErrorCode, ModelOutputDocument, PromptDocument, error_document
from workarounds.jina_gateway import StreamDocRequest, document_response, request_document, request_endpoint


def prompt_error(request: StreamDocRequest) -> str | None:
    """Why the request's document is not a valid PromptDocument, in words; None when it is one.

    `PromptDocument.from_protobuf` is what the executor's worker calls on it: what passes here passes there. (Fields
    PromptDocument lacks are ignored, as there.) A request whose bytes are not even a protobuf message fails here
    as it failed before, with the gRPC error of its parse failure.
    """
    try:
        prompt = PromptDocument.from_protobuf(request_document(request))
    except ValidationError as error:
        return "the document is not a valid PromptDocument: " + "; ".join(map(describe, error.errors()))
    except (ValueError, TypeError, KeyError) as error:  # a value of a kind from_protobuf cannot turn into a field
        return f"the document cannot be read as a PromptDocument: {error}"
    # Protobuf carries no lone surrogate and no int32 beyond its range, but NaN and Infinity it does.
    bad = unencodable(prompt)
    return None if bad is None else bad.message


def describe(error: Mapping[str, Any]) -> str:
    """One pydantic (v1, as jina 3.34 pins it) error as `field` and what PromptDocument expects there."""
    path = ".".join(map(str, error["loc"]))
    field = PromptDocument.__fields__.get(str(error["loc"][0]))
    expected = display_as_type(field.outer_type_) if field is not None else "see PromptDocument"
    if error["type"] == "value_error.missing":
        return f"`{path}` is missing (required, of type {expected})"
    return f"`{path}` must be of type {expected}: {error['msg']}"


def error_response(
    request: StreamDocRequest, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST
) -> StreamDocRequest:
    """The response that carries an error document (invalid_request unless `code` says otherwise), as the
    worker's responses carry the executor's."""
    return document_response(request, error_document(message, code), ModelOutputDocument)


def validating(stream_doc: StreamDocHandler) -> StreamDocHandler:
    """Wrap the gRPC request handler's `stream_doc`: requests to the streaming endpoint with a document that is
    not a valid PromptDocument get one error document; every other request goes to `stream_doc` unchanged.

    An async generator function, as gRPC requires of a streaming handler. Relaying with `async for` (as Jina's own
    handler does) keeps cancellation as it was: a cancelled call raises CancelledError in the awaited `__anext__`
    of the inner generators, down to the gateway's call to the executor, whose cancellation Jina's worker
    delivers to the executor's generator.
    """

    async def validated_stream_doc(
        request: StreamDocRequest, context: Any
    ) -> AsyncIterator[StreamDocRequest]:
        error = prompt_error(request) if request_endpoint(request) == STREAM_ENDPOINT else None
        if error is not None:
            yield error_response(request, error)
            return
        async for response in stream_doc(request, context):
            yield response

    return validated_stream_doc
