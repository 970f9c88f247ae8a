"""What the prediction tests and the predictions soak share: a scripted executor whose tokens come out when the
test releases them (so that "mid-answer" is a state the test holds, not a race), the prediction routes served in
process by uvicorn, a real redis-server on a free port, a webhook receiver, and an SSE reader."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.model_info import ModelInfo
from gateway.predictions import PredictionSettings, add_prediction_routes
from harness.processes import free_port, port_open
from schemas import ErrorCode, ModelOutputDocument, PromptDocument, error_document

# Token texts of the scripted executor: spaces, a line break alone, one inside a token, non-ASCII, and a token that
# adds no text (the first bytes of "—", a character the tokenizer splits: its text comes with the next token).
TEXTS = [" Hello", ",", " world", "\n", "two\nlines", " é", "", "—", " end"]
REFUSE, OVERLOAD, FAIL = "REFUSE", "OVERLOAD", "FAIL"


def token_text(index: int) -> str:
    return TEXTS[index % len(TEXTS)]


class ScriptedStreamer:
    """Stands in for Jina's streamer: `max_tokens` tokens of TEXTS per prompt, each held until the test releases
    it (`release(n)`, or `free_running=True`). Prompts containing REFUSE/OVERLOAD are refused at once, FAIL fails
    after two tokens. Counts running generations and cancellations (a closed stream) as the engine would."""

    def __init__(self, free_running: bool = False) -> None:
        self.free_running = free_running
        self._released = asyncio.Semaphore(0)
        self.running = 0
        self.cancelled = 0

    def release(self, tokens: int) -> None:
        for _ in range(tokens):
            self._released.release()

    async def stream_doc(self, doc: PromptDocument, exec_endpoint: str) -> AsyncIterator[tuple[Any, Any]]:
        prompt = doc.prompt or ""  # predictions send a prompt (PromptDocument's is optional beside messages)
        if REFUSE in prompt:
            yield error_document("prompt + max_tokens exceed the context (32)", ErrorCode.INVALID_REQUEST), None
            return
        if OVERLOAD in prompt:
            yield error_document("the service is overloaded: 6 streams", ErrorCode.OVERLOADED), None
            return
        self.running += 1
        text = ""
        try:
            for index in range(doc.max_tokens):
                if not self.free_running:
                    await self._released.acquire()
                if FAIL in prompt and index == 2:
                    yield error_document("internal error: injected", ErrorCode.INTERNAL), None
                    return
                text += token_text(index)
                last = index == doc.max_tokens - 1
                yield ModelOutputDocument(
                    token_id=index, generated_text=text, text=token_text(index), index=index,
                    finish_reason="length" if last else None,
                    prompt_tokens=3 if last else None, completion_tokens=doc.max_tokens if last else None,
                    time_to_first_token_s=0.01 if last else None, total_time_s=0.1 if last else None,
                ), None
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def answer_of(max_tokens: int) -> str:
    return "".join(token_text(index) for index in range(max_tokens))


@dataclass
class Gateway:
    url: str
    app: FastAPI
    server: uvicorn.Server
    task: asyncio.Task

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=60, **kwargs)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[tuple[str, uvicorn.Server, asyncio.Task]]:
    """`app` on a free port, in this event loop, with its startup and shutdown events."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server, task
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def gateway(streamer: Any, **settings: Any) -> AsyncIterator[Gateway]:
    """The prediction routes over `streamer`, as LLMHTTPGateway adds them, served in process. The default store
    (SQLite) gets a file in a fresh directory unless `sqlite_path` names one."""
    model_info = ModelInfo(streamer, "test-model")
    with tempfile.TemporaryDirectory(prefix="predictions-") as tmp:
        settings.setdefault("sqlite_path", str(Path(tmp) / "predictions.sqlite3"))
        app = add_prediction_routes(FastAPI(), streamer, model_info, PredictionSettings.parse(settings))
        async with serving(app) as (url, server, task):
            yield Gateway(url, app, server, task)


@dataclass
class Receiver:
    """A webhook receiver: records each POSTed JSON; answers 500 to the first `failures` POSTs of each status."""

    failures: int = 0
    received: list[dict] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> JSONResponse:
            body = await request.json()
            key = body["status"]
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if self.attempts[key] <= self.failures:
                return JSONResponse({"error": "not now"}, status_code=500)
            self.received.append(body)
            return JSONResponse({})

        return app


@asynccontextmanager
async def receiver(failures: int = 0) -> AsyncIterator[Receiver]:
    hooks = Receiver(failures)
    async with serving(hooks.app()) as (url, _server, _task):
        hooks.url = url + "/hook"
        yield hooks


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A real redis-server (Debian's package) on a free port, its files in `tmp`; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: apt-get install redis-server (.ci/run does)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The events of a text/event-stream body as {"event", "id", "data"}, data lines joined with "\\n"."""
    event: dict[str, Any] = {}
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data or "event" in event:
                yield {**event, "data": "\n".join(data)}
            event, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name in ("event", "id", "retry"):
                event[name] = value


async def eventually_async(predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)
