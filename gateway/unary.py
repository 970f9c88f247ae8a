"""`POST /generate`: the unary HTTP call, a list of PromptDocuments answered with the last document of each.

Jina's own route for the executor's unary `/generate` endpoint sent every document of the call in one request to
the executor and answered when all were done. Measured: 40 documents in one call filled the whole batch, and a
client that left after 3 s did not stop them (all 40 ran on to max_tokens). This route replaces it:

- a call takes at most `max_documents` documents (400 naming the limit past it);
- each document is one stream to the executor's `/stream` (gateway/streams.py), so each counts toward the engine's
  admission (max_running + max_waiting) like any other stream;
- the call answers 200 only when every document ended normally; the first that fails (refused before its first
  token, e.g. `overloaded`, or failing later) decides the status by its error code, as on the OpenAI routes
  (429 with Retry-After when the replica is full), names the document, and cancels the others;
- a client that goes away cancels every generation of the call.

The body and the answer keep Jina's shape (`{"data": [...]}` in, `{"header": {...}, "data": [...]}` out), so Jina's
HTTP Client (`Client(protocol="http").post("/generate", ...)`) works unchanged.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from docarray.base_doc.docarray_response import DocArrayResponse
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from gateway.app import error_response, read_json, until_disconnect
from gateway.encodable import require_encodable
from gateway.openai_api import OpenAIError, failure
from gateway.streams import DocStream
from gateway.validation import describe
from schemas import ModelOutputDocument, PromptDocument
from workarounds.jina_gateway import remove_routes

GENERATE_PATH = "/generate"
DEFAULT_MAX_GENERATE_DOCUMENTS = 8


class Failed(Exception):
    """A document of the call ended in failure: the call answers with its error."""

    def __init__(self, error: OpenAIError) -> None:
        super().__init__(error.message)
        self.error = error


def add_generate_route(app: FastAPI, streamer: Any, max_documents: int) -> FastAPI:
    """Replace Jina's `POST /generate` of `app` by this module's route."""
    if max_documents < 1:
        raise ValueError(f"max_generate_documents must be >= 1, got {max_documents}")
    remove_routes(app, GENERATE_PATH, "POST")

    @app.post(GENERATE_PATH)
    async def generate(request: Request) -> Response:
        try:
            prompts, request_id = parse_body(await read_json(request), max_documents)
        except OpenAIError as error:
            return error_response(error)
        streams = [DocStream(streamer, prompt) for prompt in prompts]
        readers = [asyncio.ensure_future(last_document(number, stream)) for number, stream in enumerate(streams)]
        try:
            results = await until_disconnect(request, asyncio.gather(*readers))
        except Failed as failed:
            return error_response(failed.error)
        finally:  # the call is answered, failed or left: no generation of it runs on
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await asyncio.gather(*(stream.close() for stream in streams))
        if results is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        return DocArrayResponse({"header": {"request_id": request_id}, "data": results})

    return app


def parse_body(body: Any, max_documents: int) -> tuple[list[PromptDocument], str]:
    """The call's PromptDocuments (Jina's body: `data`, one document or a list of them; `header.request_id`
    optional; `parameters` and the rest ignored, as the executor ignores them) and its request id."""
    if not isinstance(body, dict) or "data" not in body:
        raise OpenAIError(400, 'send a JSON object with the PromptDocuments in `data`: {"data": [{...}]}', param="data")
    data = body["data"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise OpenAIError(400, "`data` holds no document: send at least one PromptDocument", param="data")
    if len(items) > max_documents:
        raise OpenAIError(
            400,
            f"a /generate call takes at most {max_documents} documents (max_generate_documents), got {len(items)}: "
            "send them in several calls",
            param="data",
        )
    prompts = []
    for number, item in enumerate(items):
        where = f"data[{number}]" if isinstance(data, list) else "data"
        if not isinstance(item, dict):
            raise OpenAIError(400, f"`{where}` must be a PromptDocument (a JSON object)", param=where)
        try:
            prompts.append(PromptDocument.parse_obj(item))
        except ValidationError as error:
            reasons = "; ".join(map(describe, error.errors()))  # pydantic's own text names its classes
            raise OpenAIError(400, f"`{where}` is not a valid PromptDocument: {reasons}", param=where) from None
        require_encodable(prompts[-1], where)
    header = body.get("header")
    request_id = header.get("request_id") if isinstance(header, dict) else None
    return prompts, str(request_id) if request_id else uuid.uuid4().hex


async def last_document(number: int, stream: DocStream) -> ModelOutputDocument:
    """The last document of one generation; Failed when it ends in failure."""
    last = None
    async for doc in stream:
        last = doc
    assert last is not None  # a DocStream always ends with a document that carries a finish_reason
    if (error := failure(last)) is not None:
        error.message = f"data[{number}]: {error.message}"
        raise Failed(error)
    return last
