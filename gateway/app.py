"""The HTTP routes beside Jina's own (`GET /stream` SSE): the OpenAI-compatible API, the WebSocket chat and the
page. Thin: each route translates a request into a PromptDocument and the executor's documents into
chunks/events; generation, templates and limits live in the executor and the engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

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
from gateway.streams import DocStream
from schemas import ErrorCode, ModelOutputDocument, PromptDocument

STATIC = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def add_routes(app: FastAPI, streamer: Any, model_info: ModelInfo) -> FastAPI:
    """Add the service's own routes to Jina's FastAPI app (which already serves `GET /stream` as SSE).
    `model_info`: the model the OpenAI API serves, and under which id (gateway/model_info.py)."""
    # The page replaces Jina's health check at `/`: it answers 200 as well, which is all readiness checks need.
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) != "/"]
    index_html = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

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
            try:
                body = await request.json()
            except ValueError as error:
                raise OpenAIError(400, f"the request body is not valid JSON: {error}") from None
            parsed = parse_request(request_model, body)
            prompt = make_prompt(parsed.document_fields())
            info = await model_info.check(parsed.model)
        except OpenAIError as error:
            return error_response(error)
        builder = ResponseBuilder(parsed, info.model, info.fingerprint)
        stream = DocStream(streamer, prompt)
        # The first document decides the status: a refused request is a 4xx, before any stream starts.
        first = await until_disconnect(request, stream.first())
        if first is None:
            await stream.close()
            return Response(status_code=499)
        if (refusal := failure(first)) is not None:
            await stream.close()
            return error_response(refusal)
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

    @app.websocket("/ws")
    async def websocket_chat(websocket: WebSocket) -> None:
        await websocket_session(websocket, streamer)

    return app


def make_prompt(fields: dict) -> PromptDocument:
    try:
        return PromptDocument(**fields)
    except ValidationError as error:
        raise OpenAIError(400, str(error)) from None


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


async def websocket_session(websocket: WebSocket, streamer: Any) -> None:
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
                    usage = {"prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens}
                    await send({"type": "end", "id": number, "finish_reason": doc.finish_reason,
                                "text": doc.generated_text, "usage": usage})

    try:
        while True:
            try:
                message = await websocket.receive_json()
            except (ValueError, KeyError):
                await refuse("send JSON messages")
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
                await refuse(f"unknown message type {kind!r}")
                continue
            if running is not None and not running.done():
                await refuse('an answer is still running: wait for its end or send {"type": "cancel"}')
                continue
            fields = {key: value for key, value in message.items() if key in PROMPT_FIELDS}
            fields.setdefault("max_tokens", DEFAULT_WS_MAX_TOKENS)
            fields["messages"], fields["prompt"] = conversation.messages(message)
            try:
                prompt = PromptDocument(**fields)
            except ValidationError as error:
                await refuse(str(error))
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
