"""A prediction watched from a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright) with the
browser's own EventSource, through a proxy that cuts the first event stream mid-answer, as a load balancer or a
flaky network does: the EventSource reconnects with Last-Event-ID and the page shows the whole answer, once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from harness.browser import chromium
from harness.processes import free_port
from harness.service import Service, idle

pytestmark = pytest.mark.browser

CUT_AFTER = 5  # output events the first stream delivers before the proxy cuts it
EVENT_END = b"\n\n"

WATCH = """(url) => {
  window.seen = {text: "", ids: [], opens: 0, drops: 0, done: null};
  const answer = document.createElement("pre");
  answer.id = "prediction";
  document.body.append(answer);
  const source = new EventSource(url);
  source.onopen = () => { window.seen.opens += 1; };
  source.addEventListener("output", (event) => {
    window.seen.text += event.data;
    window.seen.ids.push(Number(event.lastEventId));
    answer.textContent = window.seen.text;
  });
  source.addEventListener("error", (event) => {
    if (event.data) { window.seen.failure = event.data; } else { window.seen.drops += 1; }  // a dropped connection
  });
  source.addEventListener("done", (event) => { window.seen.done = JSON.parse(event.data); source.close(); });
}"""


@dataclass
class CuttingProxy:
    """Forwards TCP to the service; the first response of an event stream is cut after CUT_AFTER output events
    (right after the last one's blank line). Records the request heads of event streams."""

    upstream: int
    port: int = field(default_factory=free_port)
    stream_requests: list[bytes] = field(default_factory=list)  # whole request heads, in order
    streams_requested: int = 0
    connections: set[asyncio.Task] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self.relay(reader, writer)
        except asyncio.CancelledError:
            # The proxy is stopping: end the handler quietly (asyncio's server logs a cancelled handler as an error).
            writer.close()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        cut: list[bool] = []  # holds True while this connection carries the stream to cut

        async def to_upstream() -> None:
            head: bytes | None = None  # an event stream's request head, while its reads come in
            while data := await reader.read(65536):
                if head is None and b"/stream" in data.split(b"\r\n", 1)[0]:
                    head = b""
                    self.streams_requested += 1
                    if self.streams_requested == 1:
                        cut.append(True)
                if head is not None:  # a head may come in several reads (a loaded machine splits them)
                    head += data
                    if b"\r\n\r\n" in head:
                        self.stream_requests.append(head.split(b"\r\n\r\n", 1)[0])
                        head = None
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            # The stream's response so far (it follows its request: HTTP/1.1 does not pipeline), as an event may
            # arrive split over several reads.
            received = b""
            while data := await up_reader.read(65536):
                if cut:
                    forwarded = len(received)
                    received += data
                    if (end := end_of_event(received, CUT_AFTER)) is not None:
                        writer.write(received[forwarded:end])
                        await writer.drain()
                        return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(to_upstream()), asyncio.create_task(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        for stream in (writer, up_writer):
            stream.close()
            with contextlib.suppress(Exception):
                await stream.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def end_of_event(received: bytes, count: int) -> int | None:
    """Where the `count`-th output event of `received` ends (after its blank line), or None if it has not yet."""
    position = 0
    for _ in range(count):
        start = received.find(b"event: output", position)
        end = received.find(EVENT_END, start) if start >= 0 else -1
        if end < 0:
            return None
        position = end + len(EVENT_END)
    return position


@asynccontextmanager
async def cutting_proxy(service: Service) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(service.http_port)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", proxy.port)
    try:
        yield proxy
    finally:
        server.close()
        for connection in proxy.connections:
            connection.cancel()
        await asyncio.gather(*proxy.connections, return_exceptions=True)


async def test_an_event_source_survives_a_dropped_connection_and_shows_the_answer_once(tiny_service):
    await idle(tiny_service)
    async with (
        cutting_proxy(tiny_service) as proxy,
        httpx.AsyncClient(base_url=proxy.url, timeout=120) as client,
        chromium() as browser,
    ):
        fields = {"prompt": "hello there", "max_tokens": 40, "chat_template": False}
        response = await client.post("/v1/predictions", json={"input": fields, "stream": True})
        assert response.status_code == 201, response.text
        prediction = response.json()
        page = await browser.new_page()
        await page.goto(proxy.url + "/")  # the service's own page: the stream is then same-origin
        await page.evaluate(WATCH, prediction["urls"]["stream"])
        await page.wait_for_function("() => window.seen.done !== null", timeout=120_000)
        seen = await page.evaluate("window.seen")
        shown = await page.text_content("#prediction")
        final = (await client.get(prediction["urls"]["get"])).json()
    assert final["status"] == "succeeded" and len(final["output"]) > CUT_AFTER, "the answer should outlast the cut"
    # The first stream was cut; the EventSource reconnected once, saying where it was.
    assert seen["drops"] == 1 and seen["opens"] == 2, seen
    assert len(proxy.stream_requests) == 2, proxy.stream_requests
    assert f"last-event-id: {CUT_AFTER - 1}".encode() in proxy.stream_requests[1].lower(), proxy.stream_requests
    # Every token once, in order: no gap, no repeat.
    assert seen["ids"] == list(range(len(final["output"])))
    assert seen["text"] == shown == "".join(final["output"])
    assert seen["done"] == {"status": "succeeded"}
