"""Predictions (Replicate's API shape): a generation created once, that runs to its end whether anyone is connected
or not, and that clients watch by polling with an offset or through an event stream they can resume.

    POST /v1/predictions               {"input": {PromptDocument fields}, "webhook": url, "webhook_events_filter": [..]}
    GET  /v1/predictions/{id}          ?offset=N: output from token N on; ?wait=S: hold until there is something new
    GET  /v1/predictions/{id}/stream   text/event-stream; resumes after `Last-Event-ID` (or from ?offset=N)
    POST /v1/predictions/{id}/cancel

The runner of a prediction reads the executor's documents through a DocStream (gateway/streams.py) and writes
them to the store (gateway/prediction_store.py); the routes only read the store, so any gateway sharing a Redis
store serves any prediction. Cancelling closes the DocStream on the gateway that runs it: the engine frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gateway.app import SSE_HEADERS, read_json
from gateway.encodable import unencodable
from gateway.model_info import ModelInfo
from gateway.openai_api import DEFAULT_MAX_TOKENS, OpenAIError, failure
from gateway.prediction_store import (
    MemoryStore,
    Prediction,
    PredictionStore,
    RedisStore,
    Snapshot,
    SQLiteStore,
    StoreFull,
    now_iso,
)
from gateway.streams import DocStream
from lifecycle.cache import cache_root
from schemas import ErrorCode, ModelOutputDocument, PromptDocument

log = logging.getLogger(__name__)

REDIS_URL_ENV = "PREDICTIONS_REDIS_URL"
INPUT_FIELDS = frozenset(PromptDocument.__fields__) - {"id"}
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")  # Replicate's; this service has no logs to send
WEBHOOK_TIMEOUT_S = 10.0
WEBHOOK_OUTPUT_INTERVAL_S = 0.5  # output webhooks at most this often per prediction, as Replicate throttles them
WEBHOOK_BACKOFF_S = 0.5  # then doubled per attempt
SSE_RETRY_MS = 1000  # how soon an EventSource reconnects after a dropped connection
STORES = ("sqlite", "memory")  # without redis_url
# What a prediction whose executor could not be reached, or went away mid-answer, reads as its error.
EXECUTOR_LOST_ERROR = "the engine became unreachable while the prediction ran: create it again"
GATEWAY_STOPPED_ERROR = "the gateway stopped before the prediction ended"


@dataclass(frozen=True)
class PredictionSettings:
    """flow.yml's `gateway: uses_with: predictions: {...}`."""

    redis_url: str | None = None  # None: `store` (one gateway); also read from PREDICTIONS_REDIS_URL
    redis_prefix: str = "llm:prediction:"  # the keys of one service, when several share a Redis
    store: str = "sqlite"  # without redis_url: "sqlite" (kept across restarts) or "memory" (gone with the process)
    sqlite_path: str | None = None  # None: predictions-<HTTP port>.sqlite3 in the cache directory
    ttl_s: float = 3600.0  # how long a finished prediction stays readable
    max_kept: int = 10000  # predictions kept at most; the oldest finished ones make room
    max_wait_s: float = 60.0  # the longest long poll (`?wait=`)
    refusal_wait_s: float = 2.0  # how long a create waits for the executor's refusal (then 201 while it queues)
    keepalive_s: float = 15.0  # an event stream with nothing new sends a comment this often
    webhook_attempts: int = 4
    # Host names, addresses or networks (10.0.0.0/8) that webhooks may reach although they are not public: by
    # default a webhook to a loopback, link-local, private, ... address is refused, so that a client cannot make the
    # gateway POST into its own network (the executor, a cloud's metadata service).
    webhook_allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, settings: dict[str, Any] | None) -> PredictionSettings:
        settings = dict(settings or {})
        if unknown := sorted(set(settings) - {f.name for f in fields(cls)}):
            raise ValueError(f"unknown predictions setting(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        settings.setdefault("redis_url", os.environ.get(REDIS_URL_ENV) or None)
        settings["webhook_allowed_hosts"] = tuple(settings.get("webhook_allowed_hosts") or ())
        parsed = cls(**settings)
        if parsed.store not in STORES:
            raise ValueError(f"predictions setting store must be one of {list(STORES)}, got {parsed.store!r}")
        for name in ("ttl_s", "max_kept", "max_wait_s", "keepalive_s", "webhook_attempts"):
            if not getattr(parsed, name) > 0:
                raise ValueError(f"predictions setting {name} must be above 0, got {getattr(parsed, name)!r}")
        parsed.webhook_guard()  # a bad entry fails the start
        return parsed

    def webhook_guard(self) -> WebhookGuard:
        return WebhookGuard.parse(self.webhook_allowed_hosts)

    def make_store(self, port: int | None) -> PredictionStore:
        """The store these settings name; `port`, the gateway's HTTP port, names the default SQLite file: a
        gateway restarted on its port finds its predictions, and two services on one machine keep theirs apart."""
        if self.redis_url:
            return RedisStore(self.redis_url, self.ttl_s, self.max_kept, self.redis_prefix)
        if self.store == "memory":
            return MemoryStore(self.ttl_s, self.max_kept)
        name = "predictions.sqlite3" if port is None else f"predictions-{port}.sqlite3"
        return SQLiteStore(Path(self.sqlite_path) if self.sqlite_path else cache_root() / name, self.ttl_s,
                           self.max_kept)


# Requests ----------------------------------------------------------------------------------------------------------


@dataclass
class CreateRequest:
    prompt: PromptDocument
    input: dict[str, Any]  # as sent, with the default max_tokens: what the prediction echoes
    version: str | None
    webhook: str | None
    webhook_events_filter: list[str]


def bad_request(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code="invalid_value")


def parse_create(body: Any) -> CreateRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    input = body.get("input")
    if not isinstance(input, dict):
        raise bad_request("input", "required, a JSON object of PromptDocument fields (prompt, max_tokens, ...)")
    if unknown := sorted(set(input) - INPUT_FIELDS):
        raise bad_request(f"input.{unknown[0]}", f"unknown field; the fields are {', '.join(sorted(INPUT_FIELDS))}")
    input = {"max_tokens": DEFAULT_MAX_TOKENS, **input}
    try:
        prompt = PromptDocument(**input)
    except ValidationError as error:
        first = error.errors()[0]
        param = "input." + ".".join(str(part) for part in first["loc"])
        raise bad_request(param, first["msg"]) from None
    if (bad := unencodable(prompt, "input")) is not None:
        raise bad_request(bad.param, bad.problem)
    version = body.get("version")
    if version is not None and not isinstance(version, str):
        raise bad_request("version", "must be a string")
    webhook = body.get("webhook")
    if webhook is not None:
        url = urlsplit(webhook) if isinstance(webhook, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise bad_request("webhook", "must be an http:// or https:// URL")
    events = body.get("webhook_events_filter")
    if events is None:
        events = ["start", "output", "completed"]
    elif not isinstance(events, list) or not all(event in WEBHOOK_EVENTS for event in events):
        raise bad_request("webhook_events_filter", f"must be a list of {', '.join(WEBHOOK_EVENTS)}")
    return CreateRequest(prompt, input, version, webhook, events)


def query_number(request: Request, name: str, default: float, maximum: float, integer: bool) -> float:
    raw = request.query_params.get(name)
    return default if raw is None else number(name, raw, maximum, integer)


def number(name: str, raw: str, maximum: float, integer: bool) -> float:
    """`raw` (a query parameter's or a header's text) as a number from 0 to `maximum`, or a 400 naming `name`."""
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise bad_request(name, f"must be a {'whole ' if integer else ''}number, got {raw!r}") from None
    if not 0 <= value <= maximum:
        raise bad_request(name, f"must be between 0 and {maximum if integer else f'{maximum:g}'}, got {raw}")
    return value


# Rendering ---------------------------------------------------------------------------------------------------------


def urls(base_url: str, id: str) -> dict[str, str]:
    get = f"{base_url.rstrip('/')}/v1/predictions/{id}"
    return {"get": get, "cancel": f"{get}/cancel", "stream": f"{get}/stream"}


def render(snapshot: Snapshot, base_url: str) -> dict[str, Any]:
    """Replicate's prediction JSON; `output` is the list of token texts from the snapshot's offset on."""
    prediction = snapshot.prediction
    return {
        "id": prediction.id,
        "model": prediction.model,
        "version": prediction.version,
        "status": prediction.status,
        "input": prediction.input,
        "output": snapshot.output,
        "offset": snapshot.offset,
        "error": prediction.error,
        "error_code": prediction.error_code,
        "logs": "",
        "metrics": prediction.metrics,
        "created_at": prediction.created_at,
        "started_at": prediction.started_at,
        "completed_at": prediction.completed_at,
        "webhook": prediction.webhook,
        "webhook_events_filter": prediction.webhook_events_filter,
        "urls": urls(base_url, prediction.id),
    }


def error_json(error: OpenAIError) -> JSONResponse:
    """The API's error JSON, plus RFC 7807's `detail` and `status`, which Replicate's clients read."""
    return JSONResponse({**error.body(), "detail": error.message, "status": error.status}, status_code=error.status)


def ending(doc: ModelOutputDocument) -> dict[str, Any]:
    """The record's changes for the document that ends a generation."""
    metrics = {
        "input_token_count": doc.prompt_tokens,
        "output_token_count": doc.completion_tokens,
        "cached_token_count": doc.cached_tokens,
        "time_to_first_token": doc.time_to_first_token_s,
        "queue_time": doc.queue_time_s,
        "predict_time": doc.total_time_s,
    }
    changes: dict[str, Any] = {
        "completed_at": now_iso(),
        "metrics": {name: value for name, value in metrics.items() if value is not None},
    }
    if doc.finish_reason == "cancelled":
        return {**changes, "status": "canceled"}
    if (error := failure(doc)) is not None:
        # The relay's "retry later" would read as if the prediction might still come: it cannot.
        message = EXECUTOR_LOST_ERROR if error.code == ErrorCode.UNAVAILABLE.value else error.message
        return {**changes, "status": "failed", "error": message, "error_code": error.code}
    return {**changes, "status": "succeeded"}


def sse_event(event: str, id: int, data: str) -> bytes:
    # A text holding line breaks goes as several data lines, which the client joins with "\n".
    lines = "".join(f"data: {line}\n" for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return f"event: {event}\nid: {id}\n{lines}\n".encode()


def end_events(prediction: Prediction, count: int) -> list[tuple[int, str, str]]:
    """(id, event, data) of what follows the `count` outputs of an ended prediction: error (when it failed), done."""
    events = []
    if prediction.status == "failed":
        events.append((count, "error", json.dumps({"detail": prediction.error, "code": prediction.error_code})))
    events.append((count + len(events), "done", json.dumps({"status": prediction.status})))
    return events


# Webhooks ----------------------------------------------------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class WebhookRefused(Exception):
    """A webhook whose host is, or resolves to, an address the gateway does not POST to."""


def internal_kind(address: Address) -> str | None:
    """What makes `address` one of the gateway's own network's (loopback, link-local, ...); None when public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    kinds = [("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
             ("link-local", address.is_link_local), ("multicast", address.is_multicast),
             ("private", address.is_private), ("non-public", not address.is_global)]
    return next((kind for kind, flag in kinds if flag), None)


async def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to, in the resolver's order (an address: itself). OSError when it does not."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


@dataclass(frozen=True)
class WebhookGuard:
    """Where webhooks may go: public addresses, and the hosts and networks of `webhook_allowed_hosts`. Checked when
    a prediction is created (a 400) and again, on the address the POST then connects to, each time one is sent: a
    name that resolved to a public address at creation may resolve to an internal one later (DNS rebinding)."""

    names: frozenset[str]
    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, hosts: Sequence[str]) -> WebhookGuard:
        names, networks = set(), []
        for host in hosts:
            entry = str(host).strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if not HOST_NAME.fullmatch(entry) or entry.replace(".", "").isdigit():
                    raise ValueError(f"predictions setting webhook_allowed_hosts: {host!r} is neither a host name "
                                     "nor an address or network (10.0.0.0/8)") from None
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    async def addresses(self, url: httpx.URL) -> list[Address] | None:
        """The addresses a POST to `url` may connect to; None when the setting names its host (connect by name).
        WebhookRefused when an address it resolves to is internal and not allowed; OSError when it does not
        resolve."""
        host = url.host
        if host in self.names:
            return None
        found = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
        for address in found:
            if (kind := internal_kind(address)) and not any(address in network for network in self.networks):
                where = f"{host} is" if host == str(address) else f"{host} resolves to {address},"
                article = "an" if kind[0] in "aeiou" else "a"
                raise WebhookRefused(
                    f"{where} {article} {kind} address: the gateway sends webhooks to public addresses only, unless "
                    "its predictions setting webhook_allowed_hosts names the host or a network holding the address"
                )
        return found

    async def check(self, url: str) -> None:
        """A create's webhook: 400 naming the field when it may not be sent to."""
        try:
            await self.addresses(httpx.URL(url))
        except WebhookRefused as refusal:
            raise bad_request("webhook", str(refusal)) from None
        except OSError as error:
            raise bad_request("webhook", f"{httpx.URL(url).host} does not resolve ({error})") from None

    async def post(self, http: httpx.AsyncClient, url: str, payload: Any) -> httpx.Response:
        """POST `payload` to `url` through an address resolved and checked now, the first that connects. The URL
        names the address; the Host header and TLS (SNI, the certificate's name) keep the URL's host."""
        target = httpx.URL(url)
        addresses = await self.addresses(target)
        if addresses is None:
            return await http.post(target, json=payload, timeout=WEBHOOK_TIMEOUT_S)
        headers = {"Host": target.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):  # the next address, as a client connecting by name would
                return await http.post(target.copy_with(host=str(address)), json=payload, headers=headers,
                                       extensions=extensions, timeout=WEBHOOK_TIMEOUT_S)
        return await http.post(target.copy_with(host=str(addresses[-1])), json=payload, headers=headers,
                               extensions=extensions, timeout=WEBHOOK_TIMEOUT_S)


class WebhookSender:
    """POSTs a prediction's events to its webhook in order, each with retries: start, output (coalesced: what is
    sent is the prediction as it is when the POST goes out), completed (which supersedes pending output)."""

    def __init__(self, http: httpx.AsyncClient, guard: WebhookGuard, url: str, events: list[str], attempts: int,
                 payload: Callable[[], Any]) -> None:
        self._http, self._guard, self._url, self._events, self._attempts = http, guard, url, frozenset(events), attempts
        self._payload = payload  # async: the prediction's JSON now
        self._due: set[str] = set()
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    def notify(self, event: str) -> None:
        if event in self._events or event == "completed":  # completed also ends the sender
            self._due.add(event)
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for event in ("start", "completed", "output"):
                if event in self._due:
                    self._due.discard(event)
                    break
            else:
                continue
            if event == "completed":
                if "completed" in self._events:
                    await self._post(event)
                return
            await self._post(event)
            if event == "output":
                await asyncio.sleep(WEBHOOK_OUTPUT_INTERVAL_S)
            if self._due:
                self._wake.set()

    async def _post(self, event: str) -> None:
        for attempt in range(self._attempts):
            try:
                response = await self._guard.post(self._http, self._url, await self._payload())
                if response.is_success:
                    return
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    log.warning(f"webhook {event} refused by {self._url}: HTTP {response.status_code}")
                    return
                reason = f"HTTP {response.status_code}"
            except WebhookRefused as refusal:
                log.warning(f"webhook {event} to {self._url} not sent: {refusal}")
                return
            except (httpx.HTTPError, OSError) as error:  # OSError: the host does not resolve (now)
                reason = repr(error)
            if attempt + 1 < self._attempts:
                await asyncio.sleep(WEBHOOK_BACKOFF_S * 2**attempt)
        log.warning(f"webhook {event} to {self._url} failed {self._attempts} times, last: {reason}")


# The runner and the routes -----------------------------------------------------------------------------------------


class Predictions:
    """Runs this gateway's predictions and answers the routes from the store."""

    def __init__(self, streamer: Any, model_info: ModelInfo, settings: PredictionSettings,
                 port: int | None = None) -> None:
        self.streamer = streamer
        self.model_info = model_info
        self.settings = settings
        self.store = settings.make_store(port)
        self.webhook_guard = settings.webhook_guard()
        self.store.on_cancel = self._stop_local
        self._streams: dict[str, DocStream] = {}  # the predictions this gateway runs
        self._runners: set[asyncio.Task] = set()
        self._webhooks: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        await self.store.start()
        self._http = httpx.AsyncClient()

    async def close(self) -> None:
        """Server shutdown: the predictions still running here fail (the drain on SIGTERM has let them end first)."""
        for stream in list(self._streams.values()):
            await stream.close()
        await asyncio.gather(*self._runners, return_exceptions=True)
        for webhook in self._webhooks:  # a webhook still retrying must not hold the shutdown for its backoff
            webhook.cancel()
        await asyncio.gather(*self._webhooks, return_exceptions=True)
        await self.store.close()
        if self._http is not None:
            await self._http.aclose()

    @staticmethod
    def _keep(task: asyncio.Task, tasks: set[asyncio.Task]) -> None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _stop_local(self, id: str) -> None:
        if (stream := self._streams.get(id)) is not None:
            self._keep(asyncio.create_task(stream.close()), self._runners)

    async def create(self, request: CreateRequest, base_url: str) -> Snapshot:
        if request.webhook is not None:
            await self.webhook_guard.check(request.webhook)
        model = await self.model_info.name()  # 503 while the executor cannot say
        prediction = Prediction(
            id=uuid.uuid4().hex,
            model=model,
            version=request.version or model,
            input=request.input,
            created_at=now_iso(),
            webhook=request.webhook,
            webhook_events_filter=request.webhook_events_filter if request.webhook else None,
        )
        try:
            await self.store.create(prediction)
        except StoreFull as error:
            raise OpenAIError(429, f"the service is overloaded: {error}", type="rate_limit_error",
                              code=ErrorCode.OVERLOADED.value) from None
        stream = DocStream(self.streamer, request.prompt)
        # The executor refuses a request it cannot serve (context, overload) at once, before any token: wait for
        # that long enough to answer it as a 4xx, but not for the first token of a request that queues.
        first = asyncio.ensure_future(stream.first())
        await asyncio.wait({first}, timeout=self.settings.refusal_wait_s)
        if first.done() and (doc := first.result()) is not None and (refusal := failure(doc)) is not None:
            await stream.close()
            await self.store.delete(prediction.id)
            raise refusal
        self._streams[prediction.id] = stream
        self._keep(asyncio.create_task(self._run(prediction, stream, first, base_url)), self._runners)
        snapshot = await self.store.get(prediction.id)
        assert snapshot is not None  # just created; the TTL counts from its last change
        return snapshot

    async def _run(self, prediction: Prediction, stream: DocStream, first: asyncio.Future, base_url: str) -> None:
        id = prediction.id
        webhook = None
        if prediction.webhook and self._http is not None:
            async def payload() -> Any:
                snapshot = await self.store.get(id)
                return None if snapshot is None else render(snapshot, base_url)

            webhook = WebhookSender(self._http, self.webhook_guard, prediction.webhook,
                                    prediction.webhook_events_filter or [], self.settings.webhook_attempts, payload)
            self._keep(webhook.task, self._webhooks)
            webhook.notify("start")
        last: ModelOutputDocument | None = None
        try:
            doc = await first
            if doc is not None:
                await self.store.update(id, status="processing", started_at=now_iso())
            index = 0
            while doc is not None:
                # One output item per token, also one that adds no text yet (the first bytes of a character split
                # over several tokens): `output` then always agrees with `output_token_count`, and an item's index
                # is its token's. (An error document carries no token.)
                if doc.token_id >= 0:
                    if not await self.store.append(id, index, doc.text):
                        break  # cancelled, possibly through another gateway
                    index += 1
                    if webhook is not None:
                        webhook.notify("output")
                if doc.finish_reason is not None:
                    last = doc
                    break
                doc = await stream.first()  # the next document; None once the stream was closed
            if last is not None:
                await self.store.finish(id, **ending(last))
            else:  # closed: by a cancellation (then already canceled), or by the gateway's shutdown
                await self.store.finish(id, status="failed", completed_at=now_iso(),
                                        error=GATEWAY_STOPPED_ERROR,
                                        error_code=ErrorCode.UNAVAILABLE.value)
        except Exception as error:  # the store failed (Redis unreachable): the generation cannot be kept
            log.error(f"prediction {id} failed: {error!r}")
        finally:
            self._streams.pop(id, None)
            await stream.close()
            if webhook is not None:
                webhook.notify("completed")

    async def get(self, id: str, offset: int, wait_s: float) -> Snapshot:
        snapshot = await self.store.get(id, offset)
        if snapshot is not None and wait_s > 0 and not snapshot.output and not snapshot.prediction.ended:
            await self.store.wait(id, offset, wait_s)
            snapshot = await self.store.get(id, offset)
        if snapshot is None:
            raise self.not_found(id)
        return snapshot

    def not_found(self, id: str) -> OpenAIError:
        return OpenAIError(404, f"no prediction {id!r}: finished predictions are kept {self.settings.ttl_s:g} s",
                           code="not_found")

    async def events(self, id: str, after: int) -> AsyncIterator[bytes]:
        """The event stream from the event after `after` on: output events (id = output index), then error (when
        it failed) and done. A comment every `keepalive_s` while nothing happens."""
        yield f"retry: {SSE_RETRY_MS}\n\n".encode()
        offset = after + 1
        waited = False
        while True:
            snapshot = await self.store.get(id, offset, with_input=False)
            if snapshot is None:  # expired meanwhile
                return
            for index, text in enumerate(snapshot.output, start=offset):
                yield sse_event("output", index, text)
            offset += len(snapshot.output)
            if snapshot.prediction.ended:
                for event_id, event, data in end_events(snapshot.prediction, snapshot.count):
                    if event_id > after:
                        yield sse_event(event, event_id, data)
                return
            if waited and not snapshot.output:
                yield b": keep-alive\n\n"
            await self.store.wait(id, offset, self.settings.keepalive_s)
            waited = True


MAX_OFFSET = 2**31  # past any prediction's events (max_tokens is an int32)


def last_event_id(request: Request) -> int:
    """The last event the client has (-1: none), from `Last-Event-ID` (an EventSource's reconnection: the id of an
    event this stream sent), else from `?offset=N` (start at output N); both checked alike."""
    header = request.headers.get("last-event-id")
    if header is None:
        return int(query_number(request, "offset", 0, MAX_OFFSET, integer=True)) - 1
    return int(number("Last-Event-ID", header, MAX_OFFSET, integer=True))


def add_prediction_routes(app: FastAPI, streamer: Any, model_info: ModelInfo, settings: PredictionSettings,
                          port: int | None = None) -> FastAPI:
    """The routes; `port`: the gateway's HTTP port, which names the default SQLite file."""
    predictions = Predictions(streamer, model_info, settings, port)
    app.router.add_event_handler("startup", predictions.start)
    app.router.add_event_handler("shutdown", predictions.close)

    async def answer(request: Request, work: Callable[[], Any]) -> Response:
        """Run `work`, turning an OpenAIError into the API's error JSON. (API keys: gateway/auth.py's middleware
        refuses a request without one before it reaches these routes, as for every API route.)"""
        try:
            return await work()
        except OpenAIError as error:
            return error_json(error)
        except predictions.store.errors as error:
            log.error(f"{request.method} {request.url.path}: the prediction store failed: {error!r}")
            return error_json(OpenAIError(503, "the prediction store is unavailable, retry later", type="server_error",
                                          code=ErrorCode.UNAVAILABLE.value))

    @app.post("/v1/predictions")
    async def create(request: Request) -> Response:
        async def work() -> Response:
            snapshot = await predictions.create(parse_create(await read_json(request)), str(request.base_url))
            return JSONResponse(render(snapshot, str(request.base_url)), status_code=201)

        return await answer(request, work)

    @app.get("/v1/predictions/{id}")
    async def get(id: str, request: Request) -> Response:
        async def work() -> Response:
            offset = int(query_number(request, "offset", 0, MAX_OFFSET, integer=True))
            wait_s = query_number(request, "wait", 0, predictions.settings.max_wait_s, integer=False)
            snapshot = await predictions.get(id, offset, wait_s)
            return JSONResponse(render(snapshot, str(request.base_url)))

        return await answer(request, work)

    @app.get("/v1/predictions/{id}/stream")
    async def stream(id: str, request: Request) -> Response:
        async def work() -> Response:
            after = last_event_id(request)
            snapshot = await predictions.store.get(id, after + 1, with_input=False)
            if snapshot is None:
                raise predictions.not_found(id)
            if snapshot.prediction.ended and after >= end_events(snapshot.prediction, snapshot.count)[-1][0]:
                return Response(status_code=204)  # the client has the done event: an EventSource stops on a 204
            return StreamingResponse(predictions.events(id, after), media_type="text/event-stream",
                                     headers=SSE_HEADERS)

        return await answer(request, work)

    @app.post("/v1/predictions/{id}/cancel")
    async def cancel(id: str, request: Request) -> Response:
        async def work() -> Response:
            await predictions.store.cancel(id)
            snapshot = await predictions.store.get(id)
            if snapshot is None:
                raise predictions.not_found(id)
            return JSONResponse(render(snapshot, str(request.base_url)))

        return await answer(request, work)

    return app
