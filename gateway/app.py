"""The HTTP routes beside Jina's own: `GET /stream` (SSE, in place of Jina's), the OpenAI-compatible API, the
WebSocket chat and the page. Thin: each route translates a request into a PromptDocument and the executor's
documents into chunks/events; generation, templates and limits live in the executor and the engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.datastructures import QueryParams
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from pydantic.fields import SHAPE_LIST, SHAPE_SINGLETON

from gateway.encodable import require_encodable
from gateway.limits import HttpLimits, JsonError, parse_json
from gateway.model_info import ModelInfo
from gateway.openai_api import (
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    ResponseBuilder,
    error_code,
    failure,
    model_card,
    models_list,
    parse_request,
)
from gateway.streams import STREAM_ENDPOINT, DocStream
from gateway.validation import describe
from schemas import ErrorCode, ModelOutputDocument, PromptDocument
from workarounds.jina_gateway import remove_routes

STATIC = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


log = logging.getLogger(__name__)


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: `data` (JSON text, or what json.dumps makes one) on one line."""
    name = "" if event is None else f"event: {event}\n"
    return f"{name}data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def add_routes(app: FastAPI, streamer: Any, model_info: ModelInfo, limits: HttpLimits) -> FastAPI:
    """Add the service's own routes to Jina's FastAPI app, `GET /stream` in place of Jina's own.
    `model_info`: the model the OpenAI API serves, and under which id (gateway/model_info.py). `limits`: what a
    client may send (gateway/limits.py), for the JSON the routes read themselves."""
    # Jina's `GET /stream` answered a missing or mistyped field with a 200 and a bare `end` event, or a plain-text
    # 500, and its `end` event had no data line, so a browser's EventSource never saw it and reconnected (starting
    # the generation again). `stream_events` below replaces it.
    remove_routes(app, STREAM_ENDPOINT, "GET")
    # The page replaces Jina's health check at `/`: it answers 200 as well, which is all readiness checks need.
    remove_routes(app, "/")
    index_html = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        # The second line behind DOMPurify: only the page's own files run and style it, it talks to this service
        # alone (no image or request can carry the conversation elsewhere), and no other site may frame it.
        # `'self'` covers ws:/wss: in CSP 3; the explicit socket origins are for browsers that predate that. The
        # Host header goes into them only when it is a plain host[:port].
        host = request.headers.get("host", "")
        plain = host.isascii() and all(character.isalnum() or character in ".-:[]" for character in host)
        sockets = f" ws://{host} wss://{host}" if host and plain else ""
        policy = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        headers = {
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        return HTMLResponse(index_html, headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's vendored renderer

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            return JSONResponse(models_list(await model_info.get()))
        except OpenAIError as error:
            return error_response(error)

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        try:
            return JSONResponse(model_card(await model_info.check(model)))
        except OpenAIError as error:
            return error_response(error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await completion(request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, CompletionRequest, chat=False)

    async def completion(request: Request, request_model: type, chat: bool) -> Response:
        try:
            parsed = parse_request(request_model, await json_body(request, limits))
            require_encodable(parsed)  # named as the client sent it (max_completion_tokens, messages.0.content)
            info = await model_info.check(parsed.model)  # its chat template decides how tools are written
            prompt = make_prompt(parsed.document_fields(info))
        except OpenAIError as error:
            return error_response(error)
        builder = ResponseBuilder(parsed, info)
        opened = await open_stream(request, streamer, prompt, parsed.named)
        if isinstance(opened, Response):
            return opened
        stream, first = opened
        if parsed.stream:
            return StreamingResponse(
                stream_chunks(stream, first, builder, parsed.include_usage),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        docs = await until_disconnect(request, all_documents(stream, first))
        await stream.close()
        if docs is None:
            return Response(status_code=499)
        if (late_failure := failure(docs[-1])) is not None:  # after the first token: 500 or 503, by its code
            return error_response(late_failure)
        return JSONResponse(builder.response(docs))

    @app.get(STREAM_ENDPOINT)
    async def stream_events(request: Request) -> Response:
        """The PromptDocument's fields as query parameters (or as a JSON body, as Jina's route took them); an
        `update` event per document, then `end`. A refused request gets a 4xx (or 429, 503) before any event."""
        try:
            prompt = make_prompt(await stream_fields(request, limits))
        except OpenAIError as error:
            return error_response(error)
        opened = await open_stream(request, streamer, prompt)
        if isinstance(opened, Response):
            return opened
        return StreamingResponse(document_events(*opened), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.websocket("/ws")
    async def websocket_chat(websocket: WebSocket) -> None:
        await websocket_session(websocket, streamer, limits)

    return app


async def read_json(request: Request) -> Any:
    """The body as JSON, or OpenAIError 400 (its depth was checked before any route: gateway/limits.py)."""
    try:
        return await request.json()
    except ValueError as error:
        raise OpenAIError(400, f"the request body is not valid JSON: {error}") from None


async def json_body(request: Request, limits: HttpLimits) -> Any:
    try:
        return await parse_json(await request.body(), limits, "the request body")
    except JsonError as error:
        raise OpenAIError(400, str(error), code="invalid_json") from None


def make_prompt(fields: dict) -> PromptDocument:
    try:
        prompt = PromptDocument(**fields)
    except ValidationError as error:
        errors = error.errors()
        param = str(errors[0]["loc"][0])
        code = "missing_required_parameter" if errors[0]["type"] == "value_error.missing" else "invalid_value"
        raise OpenAIError(400, "; ".join(map(describe, errors)), param=param, code=code) from None
    require_encodable(prompt)
    return prompt


def query_kind(name: str) -> str | None:
    """How `GET /stream` reads a PromptDocument field from the query: "one" value (`max_tokens=5`), "repeated"
    (`stop=a&stop=b`), "json" (`messages=[...]`: a browser's EventSource can send no body); None: not a field."""
    field = PromptDocument.__fields__.get(name)
    if field is None:
        return None
    structured = isinstance(field.type_, type) and issubclass(field.type_, BaseModel)
    if field.shape == SHAPE_SINGLETON and not structured:
        return "one"
    return "repeated" if field.shape == SHAPE_LIST and not structured else "json"


async def stream_fields(request: Request, limits: HttpLimits) -> dict[str, Any]:
    """The PromptDocument fields of a `GET /stream`: its JSON body if it has one, else its query parameters.
    Other parameters (`api_key`, a cache-buster) are ignored, as fields PromptDocument lacks are in a body."""
    body = await request.body()
    if body:
        fields = await json_body(request, limits)
        if not isinstance(fields, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        return fields
    return await query_fields(request.query_params, limits)


async def query_fields(params: QueryParams, limits: HttpLimits) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in params:
        kind = query_kind(name)
        if kind == "one":
            fields[name] = params[name]
        elif kind == "repeated":
            fields[name] = params.getlist(name)
            if "" in fields[name]:  # `stop=` would be a stop string that never matches
                raise OpenAIError(400, f"`{name}` must not be empty: leave it out, or give each value some text",
                                  param=name, code="invalid_value")
        elif kind == "json":
            try:
                fields[name] = await parse_json(params[name], limits, f"the query parameter `{name}`")
            except JsonError as error:
                raise OpenAIError(400, str(error), param=name, code="invalid_value") from None
    return fields


async def open_stream(
    request: Request, streamer: Any, prompt: PromptDocument,
    named: Callable[[OpenAIError], OpenAIError] = lambda refusal: refusal,
) -> tuple[DocStream, ModelOutputDocument] | Response:
    """Start the generation and wait for its first document, which decides the status: a refused request gets its
    error response (4xx, or 429, 503) before any stream starts, as `named` words it for the client's fields; 499
    when the client left first."""
    stream = DocStream(streamer, prompt)
    first = await until_disconnect(request, stream.first())
    if first is None:
        await stream.close()
        return Response(status_code=499)
    if (refusal := failure(first)) is not None:
        await stream.close()
        return error_response(named(refusal))
    return stream, first


async def document_events(stream: DocStream, first: ModelOutputDocument) -> AsyncIterator[bytes]:
    """The body of `GET /stream`: each document as an `update` event, a failure after the first as an `error`
    event (the document, with `error` and `error_code`), then `end` with the finish_reason. `end` has a data line
    so that a browser's EventSource fires it: the page closes the EventSource there, which would otherwise
    reconnect and start the generation again."""
    try:
        last = first
        yield sse(first.json(), "update")
        async for last in stream:
            yield sse(last.json(), "update" if failure(last) is None else "error")
        yield sse({"finish_reason": last.finish_reason}, "end")
    finally:
        await stream.close()


async def until_disconnect(request: Request, awaitable):
    """Await `awaitable` unless the client goes away first (then None). The body is already read, so the next
    ASGI message is the disconnect."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        return None
    finally:
        watcher.cancel()


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def all_documents(stream: DocStream, first: ModelOutputDocument) -> list[ModelOutputDocument]:
    return [first, *[doc async for doc in stream]]


async def stream_chunks(
    stream: DocStream, first: ModelOutputDocument, builder: ResponseBuilder, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body. Closing the connection cancels this generator, whose `finally` cancels the generation."""
    try:
        if (opening := builder.first_chunk()) is not None:
            yield sse(opening)
        doc = first
        while True:
            if (error := failure(doc)) is not None:
                # After the 200: an error event the OpenAI SDKs raise as APIError, never a silent end.
                yield sse(error.body())
                return
            if (chunk := builder.chunk(doc)) is not None:
                yield sse(chunk)
            if doc.finish_reason is not None:
                break
            try:
                doc = await stream.__anext__()
            except StopAsyncIteration:  # cannot happen: DocStream always ends with a finished document
                yield sse(OpenAIError(500, "the stream ended early", type="server_error").body())
                return
        if include_usage:
            yield sse(builder.usage_chunk(doc))
        yield sse("[DONE]")
    finally:
        await stream.close()


# WebSocket chat ------------------------------------------------------------------------------------------------
#
# Client -> server:  {"type": "prompt", "prompt": "...", "max_tokens": 64, ...PromptDocument's optional fields}
#                       the connection keeps the conversation: each prompt is sent with the turns before it (unless
#                       "chat_template": false); "system": "..." sets its system prompt; "messages": [...] instead
#                       of "prompt" replaces the whole conversation
#                    {"type": "reset"}   forget the conversation
#                    {"type": "cancel"}
# Server -> client:  {"type": "start", "id": n}
#                    {"type": "token", "id": n, "text": "...", "index": i}
#                    {"type": "end", "id": n, "finish_reason": "...", "text": "whole answer", "usage": {...}}
#                    {"type": "error", "id": n or null, "message": "...", "code": "<an ErrorCode>",
#                     "finish_reason": "..." (with an id)}

PROMPT_FIELDS = set(PromptDocument.__fields__) - {"id", "prompt", "messages"}
DEFAULT_WS_MAX_TOKENS = 256
ANSWERED = ("length", "eos", "stop", "context_length")  # an answer that joins the conversation


class Conversation:
    """The turns of one WebSocket connection. An answer joins them only once it has ended normally: a cancelled
    or failed one is forgotten, with its question."""

    def __init__(self) -> None:
        self.system: str | None = None
        self.turns: list[dict[str, Any]] = []  # every turn but the system prompt

    def reset(self) -> None:
        self.system, self.turns = None, []

    def messages(self, message: dict) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The conversation to send for a prompt message, or its plain prompt (without the chat template)."""
        if "system" in message:
            self.system = message["system"] or None
        if "messages" in message:  # the client holds the conversation
            return message["messages"], None
        if message.get("chat_template") is False:
            return None, message.get("prompt")
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*system, *self.turns, {"role": "user", "content": message.get("prompt")}], None

    def answered(self, messages: list[dict[str, Any]], answer: str) -> None:
        """The conversation is now the one that was sent, and its answer."""
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        self.turns = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": answer}]


async def websocket_session(websocket: WebSocket, streamer: Any, limits: HttpLimits) -> None:
    """One connection's chat. A message past `limits.max_ws_message_bytes` never reaches it: uvicorn closes the
    connection with 1009 (gateway/limits.py)."""
    await websocket.accept()
    send_lock = asyncio.Lock()
    running: asyncio.Task | None = None
    counter = 0
    conversation = Conversation()

    async def send(message: dict) -> None:
        async with send_lock:
            await websocket.send_json(message)

    async def refuse(message: str) -> None:
        """A message the session cannot act on: an error with no answer's id; the connection stays open."""
        await send({"type": "error", "id": None, "message": message, "code": ErrorCode.INVALID_REQUEST.value})

    async def answer(number: int, prompt: PromptDocument) -> None:
        async with DocStream(streamer, prompt) as stream:
            await send({"type": "start", "id": number})
            async for doc in stream:
                if doc.text:
                    await send({"type": "token", "id": number, "text": doc.text, "index": doc.index})
                if doc.finish_reason in ("error", "shutdown"):
                    await send({"type": "error", "id": number, "message": doc.error or doc.finish_reason,
                                "code": error_code(doc).value, "finish_reason": doc.finish_reason})
                elif doc.finish_reason is not None:
                    if prompt.messages is not None and doc.finish_reason in ANSWERED:
                        conversation.answered([m.dict(include={"role", "content"}) for m in prompt.messages],
                                              doc.generated_text)
                    usage = {"prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens,
                             "cached_tokens": doc.cached_tokens}
                    await send({"type": "end", "id": number, "finish_reason": doc.finish_reason,
                                "text": doc.generated_text, "usage": usage})

    try:
        while True:
            try:
                message = await parse_json(await websocket.receive_text(), limits, "the message")
            except KeyError:  # a binary message
                await refuse("send JSON messages as text")
                continue
            except JsonError as error:
                await refuse(str(error))
                continue
            if not isinstance(message, dict):
                await refuse("send a JSON object")
                continue
            kind = message.get("type", "prompt")
            if kind == "reset":
                conversation.reset()
                continue
            if kind == "cancel":
                if running is not None and not running.done():
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
                    await send({"type": "end", "id": counter, "finish_reason": "cancelled"})
                continue
            if kind != "prompt":
                await refuse(f"unknown message type {json.dumps(kind)}: send prompt, cancel or reset")
                continue
            if running is not None and not running.done():
                await refuse('an answer is still running: wait for its end or send {"type": "cancel"}')
                continue
            fields = {key: value for key, value in message.items() if key in PROMPT_FIELDS}
            fields.setdefault("max_tokens", DEFAULT_WS_MAX_TOKENS)
            try:
                require_encodable(message)  # named as the client sent it: the prompt becomes a turn of messages
                fields["messages"], fields["prompt"] = conversation.messages(message)
                prompt = make_prompt(fields)
            except OpenAIError as error:
                await refuse(error.message)
                continue
            counter += 1
            running = asyncio.create_task(answer(counter, prompt))
    except WebSocketDisconnect:
        pass
    finally:
        # The page was closed or the connection dropped: stop the generation.
        if running is not None and not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
