"""Predictions (gateway/predictions.py): create, poll with offsets, long poll, the resumable event stream, cancel,
webhooks, bounds (TTL, max kept) and refusals; in memory and in a real redis-server, where two gateways serve the
same predictions.

The first part serves the routes in process over a scripted executor whose tokens come out when the test releases
them (harness/predictions.py): "mid-answer" is a state the test holds. The second part runs on real flows of the
tiny model, with the engine's gauges and counters."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio
import redis.exceptions
import replicate
from fastapi import FastAPI

from gateway import prediction_store
from gateway import predictions as predictions_module
from gateway.auth import Keys, RequireKey
from gateway.model_info import ModelInfo
from gateway.predictions import PredictionSettings, add_prediction_routes
from harness.predictions import (
    FAIL,
    OVERLOAD,
    REFUSE,
    ScriptedStreamer,
    answer_of,
    eventually_async,
    gateway,
    receiver,
    redis_server,
    serving,
    sse_events,
)
from harness.service import TINY_LIMITS, Service, eventually, idle, serve, stream_docs

PREDICTIONS = "/v1/predictions"
FAST_REFUSAL = {"refusal_wait_s": 0.5}  # the scripted executor refuses in microseconds; don't hold creates for 2 s
LOCAL_WEBHOOKS = {"webhook_allowed_hosts": ["127.0.0.1"]}  # the tests' receiver listens on loopback


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Any:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "memory", "redis"])
def store(request, tmp_path) -> dict[str, Any]:
    """Settings of each store; each SQLite test has a file of its own, each Redis test keys of its own."""
    if request.param == "sqlite":
        return {**FAST_REFUSAL, "sqlite_path": str(tmp_path / "predictions.sqlite3")}
    if request.param == "memory":
        return {**FAST_REFUSAL, "store": "memory"}
    return {**FAST_REFUSAL, "redis_url": request.getfixturevalue("redis_url"),
            "redis_prefix": f"test:{uuid.uuid4().hex}:"}


async def create(client: httpx.AsyncClient, status: int = 201, **body: Any) -> dict:
    response = await client.post(PREDICTIONS, json=body)
    assert response.status_code == status, response.text
    return response.json()


async def poll_to_end(client: httpx.AsyncClient, prediction: dict, streamer: ScriptedStreamer | None) -> tuple:
    """Long-poll with offsets until the prediction ends, releasing one token per poll; (texts, last body)."""
    texts: list[str] = []
    while True:
        if streamer is not None:
            streamer.release(1)
        response = await client.get(prediction["urls"]["get"], params={"offset": len(texts), "wait": 30})
        body = response.json()
        assert response.status_code == 200 and body["offset"] == len(texts)
        texts += body["output"]
        if body["status"] not in ("starting", "processing"):
            return texts, body


async def read_events(client: httpx.AsyncClient, url: str, limit: int | None = None, **headers: str) -> list[dict]:
    """The stream's events, up to `limit` output events (then the connection is dropped)."""
    events = []
    async with client.stream("GET", url, headers={"Accept": "text/event-stream", **headers}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            events.append(event)
            if limit is not None and sum(e["event"] == "output" for e in events) == limit:
                break
    return events


def outputs(events: list[dict]) -> list[dict]:
    return [event for event in events if event["event"] == "output"]


# In process, over the scripted executor --------------------------------------------------------------------------


async def test_create_then_poll_with_offsets_and_long_polls(store):
    streamer = ScriptedStreamer()
    async with gateway(streamer, **store) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 7}, stream=True)
        assert prediction["status"] == "starting" and prediction["output"] == []
        assert prediction["input"] == {"prompt": "hi", "max_tokens": 7}
        assert prediction["urls"] == {
            "get": f"{gw.url}{PREDICTIONS}/{prediction['id']}",
            "cancel": f"{gw.url}{PREDICTIONS}/{prediction['id']}/cancel",
            "stream": f"{gw.url}{PREDICTIONS}/{prediction['id']}/stream",
        }
        # A long poll is held until a token comes.
        poll = asyncio.create_task(client.get(prediction["urls"]["get"], params={"wait": 30}))
        await asyncio.sleep(0.2)
        assert not poll.done()
        streamer.release(1)
        first = (await poll).json()
        assert first["status"] == "processing" and first["output"] == [" Hello"] and first["started_at"]
        texts, last = await poll_to_end(client, prediction, streamer)
        assert last["status"] == "succeeded" and last["completed_at"] and last["error"] is None
        assert "".join(texts) == answer_of(7)
        whole = (await client.get(prediction["urls"]["get"])).json()
        assert "".join(whole["output"]) == answer_of(7) and len(whole["output"]) == 7  # a token without text too
        assert whole["metrics"]["output_token_count"] == 7 and whole["metrics"]["input_token_count"] == 3
        # Short polls from an offset: only what follows; beyond the end nothing. An ended prediction answers a
        # long poll at once.
        url = prediction["urls"]["get"]
        assert (await client.get(url, params={"offset": 5})).json()["output"] == whole["output"][5:]
        assert (await client.get(url, params={"offset": 99, "wait": 30})).json()["output"] == []
        # A cancel after the end answers with the true final state, and changes nothing.
        late = await client.post(prediction["urls"]["cancel"])
        assert late.status_code == 200 and late.json() == whole


async def test_the_event_stream_resumes_after_a_drop_with_no_gap_and_no_repeat(store):
    streamer = ScriptedStreamer()
    async with gateway(streamer, **store) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 12})
        stream_url = prediction["urls"]["stream"]
        streamer.release(4)
        before = await read_events(client, stream_url, limit=4)  # the connection drops mid-answer
        assert [e["id"] for e in outputs(before)] == ["0", "1", "2", "3"]
        assert before[0].get("retry") == "1000" or "retry" not in before[0]
        streamer.release(3)
        # A reconnection with Last-Event-ID, as an EventSource does; the prediction is still running.
        middle = await read_events(client, stream_url, limit=3, **{"Last-Event-ID": before[-1]["id"]})
        streamer.release(5)
        after = await read_events(client, stream_url, **{"Last-Event-ID": middle[-1]["id"]})
        events = outputs(before) + outputs(middle) + outputs(after)
        assert [int(e["id"]) for e in events] == list(range(12))
        final = (await client.get(prediction["urls"]["get"])).json()
        assert [e["data"] for e in events] == final["output"]
        assert "".join(e["data"] for e in events) == answer_of(12)  # line breaks inside tokens included
        done = after[-1]
        assert (done["event"], json.loads(done["data"])) == ("done", {"status": "succeeded"}) and done["id"] == "12"
        # ?offset= resumes too; after the done event there is nothing left: 204 stops an EventSource.
        tail = await read_events(client, stream_url + "?offset=9")
        assert [e["id"] for e in tail] == ["9", "10", "11", "12"]
        assert (await client.get(stream_url, headers={"Last-Event-ID": "12"})).status_code == 204
        # Last-Event-ID wins over the offset of the URL the EventSource was opened with.
        assert [e["id"] for e in await read_events(client, stream_url + "?offset=0", **{"Last-Event-ID": "10"})] == [
            "11", "12"]


async def test_a_multi_line_token_is_sent_as_several_data_lines(store):
    streamer = ScriptedStreamer(free_running=True)
    async with gateway(streamer, **store) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 5})
        response = await client.get(prediction["urls"]["stream"])
        assert "event: output\nid: 4\ndata: two\ndata: lines\n\n" in response.text
        assert "event: output\nid: 3\ndata: \ndata: \n\n" in response.text  # the token "\n"


async def test_a_failure_ends_the_stream_with_an_error_event_then_done(store):
    streamer = ScriptedStreamer(free_running=True)
    async with gateway(streamer, **store) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": f"{FAIL} now", "max_tokens": 9})
        events = await read_events(client, prediction["urls"]["stream"])
        assert [(e["event"], e["id"]) for e in events] == [("output", "0"), ("output", "1"), ("error", "2"),
                                                           ("done", "3")]
        assert json.loads(events[2]["data"]) == {"detail": "internal error: injected", "code": "internal"}
        assert json.loads(events[3]["data"]) == {"status": "failed"}
        body = (await client.get(prediction["urls"]["get"])).json()
        assert (body["status"], body["error"], body["error_code"]) == ("failed", "internal error: injected",
                                                                       "internal")
        # Resuming after the error event gives the done event only.
        resumed = await read_events(client, prediction["urls"]["stream"], **{"Last-Event-ID": "2"})
        assert [e["event"] for e in resumed] == ["done"]
        # A cancel after the failure answers failed, its error kept.
        assert (await client.post(prediction["urls"]["cancel"])).json() == body


async def test_cancel_stops_the_generation_and_ends_every_reader(store):
    streamer = ScriptedStreamer()
    async with gateway(streamer, **store) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 50})
        streamer.release(2)
        reader = asyncio.create_task(read_events(client, prediction["urls"]["stream"]))
        await eventually_async(lambda: _output_count(client, prediction, 2))
        response = await client.post(prediction["urls"]["cancel"])
        assert response.status_code == 200 and response.json()["status"] == "canceled"
        # The generation was closed (the engine would free the slot), and the reader got the end.
        await eventually_async(lambda: _true(streamer.running == 0))
        assert streamer.cancelled == 1
        events = await reader
        assert [e["event"] for e in events] == ["output", "output", "done"]
        assert json.loads(events[-1]["data"]) == {"status": "canceled"}
        body = (await client.get(prediction["urls"]["get"])).json()
        assert body["status"] == "canceled" and len(body["output"]) == 2 and body["completed_at"]
        # Cancelling again changes nothing.
        assert (await client.post(prediction["urls"]["cancel"])).json()["status"] == "canceled"


async def _output_count(client: httpx.AsyncClient, prediction: dict, count: int) -> bool:
    return len((await client.get(prediction["urls"]["get"])).json()["output"]) >= count


async def _true(value: bool) -> bool:
    return value


BAD_CREATES = [
    pytest.param({"input": {"prompt": "hi", "max_tokens": "ten"}}, "input.max_tokens", id="max-tokens-a-string"),
    pytest.param({"input": {"prompt": "hi", "max_new_tokens": 5}}, "input.max_new_tokens", id="unknown-field"),
    pytest.param({"input": {"prompt": "hi", "stop": "x"}}, "input.stop", id="stop-not-a-list"),
    pytest.param({"input": "hi"}, "input", id="input-not-an-object"),
    pytest.param({"prompt": "hi"}, "input", id="input-missing"),
    pytest.param({"input": {"prompt": "hi"}, "webhook": "ftp://x"}, "webhook", id="webhook-not-http"),
    pytest.param({"input": {"prompt": "hi"}, "webhook": "http://h/", "webhook_events_filter": ["begin"]},
                 "webhook_events_filter", id="unknown-webhook-event"),
    pytest.param({"input": {"prompt": "hi"}, "version": 3}, "version", id="version-not-a-string"),
]


@pytest.mark.parametrize("body, param", BAD_CREATES)
async def test_a_bad_create_is_a_400_naming_the_field(body, param):
    streamer = ScriptedStreamer(free_running=True)
    async with gateway(streamer, **FAST_REFUSAL) as gw, gw.client() as client:
        response = await client.post(PREDICTIONS, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(param)
        assert error["type"] == "invalid_request_error"
        assert response.json()["detail"] == error["message"]  # what Replicate's clients show
        assert streamer.running == 0


async def test_refusals_of_the_executor_and_of_the_request(store):
    streamer = ScriptedStreamer(free_running=True)
    async with gateway(streamer, **store) as gw, gw.client() as client:
        refused = await create(client, 400, input={"prompt": REFUSE, "max_tokens": 5})
        assert refused["error"]["code"] == "invalid_request" and "context" in refused["error"]["message"]
        full = await create(client, 429, input={"prompt": OVERLOAD, "max_tokens": 5})
        assert (full["error"]["code"], full["error"]["type"]) == ("overloaded", "rate_limit_error")
        assert (await client.post(PREDICTIONS, content=b"{nope")).status_code == 400
        assert (await client.post(PREDICTIONS, json=[1])).status_code == 400
        missing = f"{PREDICTIONS}/{uuid.uuid4().hex}"
        for response in [await client.get(missing), await client.get(missing + "/stream"),
                         await client.post(missing + "/cancel")]:
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 2})
        for params, name in [({"offset": -1}, "offset"), ({"offset": "x"}, "offset"), ({"wait": 61}, "wait"),
                             ({"wait": "soon"}, "wait")]:
            response = await client.get(prediction["urls"]["get"], params=params)
            assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text
        assert "60" in (await client.get(prediction["urls"]["get"], params={"wait": 61})).json()["error"]["message"]
        # Last-Event-ID and offset are checked alike (the header's N resumes at output N + 1).
        for value in ("abc", "-1", "9" * 30):
            for response, name in [
                (await client.get(prediction["urls"]["stream"], headers={"Last-Event-ID": value}), "Last-Event-ID"),
                (await client.get(prediction["urls"]["stream"], params={"offset": value}), "offset"),
            ]:
                assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text


async def test_max_kept_refuses_while_all_run_then_evicts_the_oldest_finished(store):
    streamer = ScriptedStreamer()
    async with gateway(streamer, **{**store, "max_kept": 2}) as gw, gw.client() as client:
        first = await create(client, input={"prompt": "a", "max_tokens": 1})
        second = await create(client, input={"prompt": "b", "max_tokens": 1})
        refused = await create(client, 429, input={"prompt": "c", "max_tokens": 1})
        assert "2 predictions are running" in refused["error"]["message"]
        streamer.release(1)
        assert (await poll_to_end(client, first, None))[1]["status"] == "succeeded"
        third = await create(client, input={"prompt": "c", "max_tokens": 1})  # the first, finished, made room
        assert (await client.get(first["urls"]["get"])).status_code == 404
        streamer.release(2)
        for prediction in (second, third):
            assert (await poll_to_end(client, prediction, None))[1]["status"] == "succeeded"


async def test_a_finished_prediction_is_gone_after_its_ttl(store):
    streamer = ScriptedStreamer(free_running=True)
    async with gateway(streamer, **{**store, "ttl_s": 1}) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 3})
        _, last = await poll_to_end(client, prediction, None)
        assert last["status"] == "succeeded"
        await eventually_async(lambda: _status(client, prediction["urls"]["get"], 404))
        assert (await client.get(prediction["urls"]["stream"])).status_code == 404


async def _status(client: httpx.AsyncClient, url: str, status: int) -> bool:
    return (await client.get(url)).status_code == status


async def test_webhooks_arrive_in_order_with_retries(store):
    streamer = ScriptedStreamer()
    async with (
        receiver(failures=2) as hooks,  # the first two POSTs of each status get a 500
        gateway(streamer, **store, **LOCAL_WEBHOOKS) as gw,
        gw.client() as client,
    ):
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 6}, webhook=hooks.url)
        await eventually_async(lambda: _true(len(hooks.received) == 1))
        streamer.release(6)
        await eventually_async(lambda: _true(hooks.received[-1]["status"] == "succeeded"))
        final = (await client.get(prediction["urls"]["get"])).json()
        assert hooks.received[0]["status"] == "starting" and hooks.received[0]["id"] == prediction["id"]
        assert hooks.received[-1]["output"] == final["output"] and hooks.received[-1]["metrics"] == final["metrics"]
        for body in hooks.received[1:-1]:
            assert body["status"] == "processing" and final["output"][: len(body["output"])] == body["output"]
        assert hooks.attempts["starting"] == hooks.attempts["succeeded"] == 3  # 2 failures, then delivered


async def test_webhook_events_filter_sends_only_the_chosen_events(store):
    streamer = ScriptedStreamer(free_running=True)
    async with receiver() as hooks, gateway(streamer, **store, **LOCAL_WEBHOOKS) as gw, gw.client() as client:
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 6}, webhook=hooks.url,
                                  webhook_events_filter=["completed"])
        assert prediction["webhook_events_filter"] == ["completed"]
        await eventually_async(lambda: _true(len(hooks.received) == 1))
        await asyncio.sleep(0.5)  # nothing else comes
        assert [body["status"] for body in hooks.received] == ["succeeded"]
        assert "".join(hooks.received[0]["output"]) == answer_of(6)


INTERNAL_WEBHOOKS = [
    pytest.param("http://127.0.0.1:12345/hook", "127.0.0.1 is a loopback address", id="loopback"),
    pytest.param("http://169.254.169.254/latest/meta-data/", "a link-local address", id="cloud-metadata"),
    pytest.param("https://10.1.2.3/hook", "a private address", id="private"),
    pytest.param("http://0.0.0.0:8080/", "0.0.0.0 is an unspecified address", id="unspecified"),
    pytest.param("http://[::1]:8080/", "::1 is a loopback address", id="ipv6-loopback"),
    pytest.param("http://[::ffff:127.0.0.1]/", "a loopback address", id="ipv4-mapped"),
    pytest.param("http://localhost:9/hook", "localhost resolves to", id="a-name-for-loopback"),
]


@pytest.mark.parametrize("url, reason", INTERNAL_WEBHOOKS)
async def test_a_webhook_to_the_gateways_own_network_is_a_400_naming_the_field(url, reason):
    streamer = ScriptedStreamer(free_running=True)
    # Allowing one network opens that one only.
    async with gateway(streamer, **FAST_REFUSAL, webhook_allowed_hosts=["192.168.0.0/16"]) as gw, \
            gw.client() as client:
        error = await create(client, 400, input={"prompt": "hi", "max_tokens": 2}, webhook=url)
        assert error["error"]["param"] == "webhook" and error["error"]["message"].startswith("webhook: ")
        assert reason in error["error"]["message"] and "webhook_allowed_hosts" in error["error"]["message"]
        assert streamer.running == 0


async def test_a_webhook_host_that_resolves_to_loopback_by_the_time_it_is_sent_gets_nothing(monkeypatch, caplog):
    # DNS rebinding: the name answers a public address when the prediction is created, and the receiver's
    # loopback address (what `localhost` resolves to) when the webhooks go out.
    real_resolve = predictions_module.resolve
    first_answers = [[ipaddress.ip_address("93.184.215.14")]]

    async def rebinding(host: str, port: int) -> list:
        return first_answers.pop() if first_answers else await real_resolve(host, port)

    monkeypatch.setattr(predictions_module, "resolve", rebinding)
    caplog.set_level(logging.WARNING, logger=predictions_module.__name__)
    streamer = ScriptedStreamer(free_running=True)
    async with receiver() as hooks, gateway(streamer, **FAST_REFUSAL) as gw, gw.client() as client:
        url = hooks.url.replace("127.0.0.1", "localhost")
        prediction = await create(client, input={"prompt": "hi", "max_tokens": 3}, webhook=url)
        _, last = await poll_to_end(client, prediction, None)
        assert last["status"] == "succeeded"  # the prediction itself is not affected
        # The sender handles start, output and completed in order: once completed is refused, all were (or one
        # reached the receiver, which the last assertion shows).
        await eventually_async(lambda: _true(f"webhook completed to {url} not sent" in caplog.text or hooks.attempts))
        assert "localhost resolves to 127.0.0.1, a loopback address" in caplog.text
        assert hooks.received == [] and hooks.attempts == {}


def test_webhook_allowed_hosts_takes_names_addresses_and_networks():
    guard = PredictionSettings.parse({"webhook_allowed_hosts": ["Hooks.Internal.", "10.0.0.0/8", "[::1]"]})
    assert guard.webhook_guard().names == {"hooks.internal"}
    assert [str(network) for network in guard.webhook_guard().networks] == ["10.0.0.0/8", "::1/128"]
    for bad in ("10.0.0.0/33", "10.0.0.300", "http://hooks/"):
        with pytest.raises(ValueError, match="webhook_allowed_hosts"):
            PredictionSettings.parse({"webhook_allowed_hosts": [bad]})


async def test_two_gateways_sharing_redis_serve_and_cancel_the_same_prediction(redis_url):
    settings = {**FAST_REFUSAL, "redis_url": redis_url, "redis_prefix": f"test:{uuid.uuid4().hex}:"}
    runner, other = ScriptedStreamer(), ScriptedStreamer()
    async with (
        gateway(runner, **settings) as a,
        gateway(other, **settings) as b,
        a.client() as client_a,
        b.client() as client_b,
    ):
        prediction = await create(client_a, input={"prompt": "hi", "max_tokens": 40})
        on_b = f"{b.url}{PREDICTIONS}/{prediction['id']}"
        runner.release(3)
        before = await read_events(client_b, on_b + "/stream", limit=3)
        runner.release(2)
        resumed = asyncio.create_task(read_events(client_a, prediction["urls"]["stream"],
                                                  **{"Last-Event-ID": before[-1]["id"]}))
        await eventually_async(lambda: _output_count(client_b, {"urls": {"get": on_b}}, 5))
        # Cancelled through B: A, which runs it, closes the generation.
        assert (await client_b.post(on_b + "/cancel")).json()["status"] == "canceled"
        await eventually_async(lambda: _true(runner.running == 0))
        assert (runner.cancelled, other.cancelled, other.running) == (1, 0, 0)
        events = outputs(before) + outputs(await resumed)
        assert [int(e["id"]) for e in events] == list(range(5))
        for url in (on_b, prediction["urls"]["get"]):
            body = (await client_a.get(url)).json()
            assert body["status"] == "canceled" and "".join(body["output"]) == answer_of(5)


# On real flows of the tiny model ---------------------------------------------------------------------------------

LONG = 3000  # max_tokens of a prediction that is still running when the test cancels it
PACE_S = 0.01  # at least this long a token on the paced flows: LONG tokens take 30 s at the least


@pytest.fixture(scope="module")
def paced_service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    """The tiny flow with every stream paced (tests/paced_executor.py): a LONG prediction still runs when a test
    cancels it or fills the replica with them, however fast the engine is on the machine."""
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS, "pace_s": PACE_S}
    with serve(tmp_path_factory, "paced-flow", uses_with, "tests/paced.yml") as service:
        yield service


async def test_real_flow_poll_and_stream_give_what_grpc_gives(tiny_service):
    fields = {"prompt": "hello there", "max_tokens": 16, "chat_template": False}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=120) as client:
        prediction = await create(client, input=fields, stream=True)
        polled, last = await poll_to_end(client, prediction, None)
        events = await read_events(client, prediction["urls"]["stream"])
    docs = await stream_docs(tiny_service, **fields)
    assert last["status"] == "succeeded" and last["metrics"]["output_token_count"] == docs[-1].completion_tokens
    assert polled == [doc.text for doc in docs if doc.text]
    assert [e["data"] for e in outputs(events)] == polled
    assert [int(e["id"]) for e in outputs(events)] == list(range(len(polled)))
    assert "".join(polled) == docs[-1].generated_text
    assert events[-1]["event"] == "done"


async def test_real_flow_a_prediction_runs_to_its_end_with_nobody_connected(tiny_service):
    await idle(tiny_service)
    fields = {"prompt": "nobody reads this", "max_tokens": 200, "chat_template": False}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=120) as client:
        prediction = await create(client, input=fields)
    # No connection is open while it runs.
    await eventually(lambda: tiny_service.running_streams() == 0)
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=120) as client:
        _, last = await poll_to_end(client, prediction, None)
    docs = await stream_docs(tiny_service, **fields)
    assert last["status"] == "succeeded" and "".join(last["output"]) == docs[-1].generated_text


async def test_real_flow_cancel_frees_the_engine_slot(paced_service):
    await idle(paced_service)
    cancelled = paced_service.cancelled_requests()
    async with httpx.AsyncClient(base_url=paced_service.url, timeout=120) as client:
        prediction = await create(client, input={"prompt": "Tell me everything", "max_tokens": LONG})
        assert (await client.get(prediction["urls"]["get"], params={"offset": 1, "wait": 60})).json()["output"]
        assert paced_service.running_streams() == 1
        body = (await client.post(prediction["urls"]["cancel"])).json()
        assert body["status"] == "canceled", "the prediction ended before the cancel: raise LONG"
        # The engine frees the row a moment before it counts the request as cancelled: wait for both.
        service = paced_service
        await eventually(lambda: (service.running_streams(), service.cancelled_requests()) == (0, cancelled + 1))
        final = (await client.get(prediction["urls"]["get"])).json()
        assert final["status"] == "canceled" and 0 < len(final["output"]) < LONG


async def test_real_flow_refusals_are_400_and_429(paced_service):
    await idle(paced_service)
    async with httpx.AsyncClient(base_url=paced_service.url, timeout=120) as client:
        too_long = await create(client, 400, input={"prompt": "hi", "max_tokens": 100000})
        assert too_long["error"]["code"] == "invalid_request" and "context" in too_long["error"]["message"]
        no_prompt = await create(client, 400, input={"max_tokens": 5})
        assert "prompt" in no_prompt["error"]["message"]
        # Predictions fill the replica (running and queued), then one more is refused at once.
        capacity = TINY_LIMITS["max_running"] + TINY_LIMITS["max_waiting"]
        created = [await create(client, input={"prompt": f"fill {i}", "max_tokens": LONG}) for i in range(capacity)]
        try:
            await eventually(lambda: (paced_service.running_streams(), paced_service.waiting_streams()) == (4, 2))
            full = await create(client, 429, input={"prompt": "one too many", "max_tokens": 5})
            assert (full["error"]["code"], full["error"]["type"]) == ("overloaded", "rate_limit_error")
        finally:
            for prediction in created:
                await client.post(prediction["urls"]["cancel"])
        await idle(paced_service)


async def test_the_official_replicate_client_works_unchanged(paced_service):
    client = replicate.Client(api_token="not-needed", base_url=paced_service.url)
    fields = {"prompt": "hello there", "max_tokens": 12, "chat_template": False}
    prediction = await client.predictions.async_create(version="test-model", input=fields, stream=True)
    assert prediction.status in ("starting", "processing")
    streamed = [str(event) async for event in prediction.async_stream()]
    await prediction.async_wait()
    assert prediction.status == "succeeded" and "".join(streamed) == "".join(prediction.output)
    docs = await stream_docs(paced_service, **fields)
    assert "".join(prediction.output) == docs[-1].generated_text
    again = await client.predictions.async_get(prediction.id)
    assert again.output == prediction.output and again.metrics["output_token_count"] == docs[-1].completion_tokens
    long = await client.predictions.async_create(version="test-model", input={"prompt": "go on", "max_tokens": LONG})
    await long.async_cancel()
    assert long.status == "canceled"
    with pytest.raises(replicate.exceptions.ReplicateError) as refused:
        await client.predictions.async_create(version="test-model", input={"prompt": "hi", "max_tokens": "many"})
    assert refused.value.status == 400 and "input.max_tokens" in refused.value.detail
    await idle(paced_service)


@pytest.fixture(scope="module")
def redis_flows(tmp_path_factory, tiny_model_dir, redis_url):
    """Two flows (two gateways, two executors) whose predictions live in the same Redis, paced as paced_service
    is, so a LONG prediction still runs when the test cancels it through the other gateway."""
    settings = {"predictions": {"redis_url": redis_url, "redis_prefix": f"flows:{uuid.uuid4().hex}:", "ttl_s": 8}}
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS, "pace_s": PACE_S}
    with (
        serve(tmp_path_factory, "redis-flow-a", uses_with, "tests/paced.yml", gateway_settings=settings) as a,
        serve(tmp_path_factory, "redis-flow-b", uses_with, "tests/paced.yml", gateway_settings=settings) as b,
    ):
        yield a, b


async def test_two_flows_sharing_redis_serve_resume_and_cancel_the_same_prediction(redis_flows):
    a, b = redis_flows
    fields = {"prompt": "hello there", "max_tokens": 24, "chat_template": False}
    async with httpx.AsyncClient(timeout=120) as client:
        prediction = await create_on(client, a, input=fields)
        on_b = f"{b.url}{PREDICTIONS}/{prediction['id']}"
        before = await read_events(client, on_b + "/stream", limit=3)  # through B, dropped after 3 tokens
        after = await read_events(client, prediction["urls"]["stream"], **{"Last-Event-ID": before[-1]["id"]})
        events = outputs(before) + outputs(after)
        assert [int(e["id"]) for e in events] == list(range(len(events)))
        body = (await client.get(on_b)).json()
        assert body["status"] == "succeeded" and [e["data"] for e in events] == body["output"]
        docs = await stream_docs(a, **fields)
        assert "".join(body["output"]) == docs[-1].generated_text

        # Created through B, cancelled through A: B's engine frees the slot.
        await idle(b)
        cancelled = b.cancelled_requests()
        long = await create_on(client, b, input={"prompt": "Tell me everything", "max_tokens": LONG})
        assert (await client.get(f"{a.url}{PREDICTIONS}/{long['id']}", params={"offset": 1, "wait": 60})).json()[
            "output"]
        assert (await client.post(f"{a.url}{PREDICTIONS}/{long['id']}/cancel")).json()["status"] == "canceled"
        await eventually(lambda: (b.running_streams(), b.cancelled_requests()) == (0, cancelled + 1))
        assert a.running_streams() == 0

        # Both gone from both gateways after the TTL (8 s here).
        for url in (on_b, prediction["urls"]["get"], long["urls"]["get"]):
            await eventually_async(lambda url=url: _status(client, url, 404), timeout_s=120)


async def create_on(client: httpx.AsyncClient, service: Service, **body: Any) -> dict:
    response = await client.post(service.url + PREDICTIONS, json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def test_a_redis_outage_is_a_503_without_internal_detail(tmp_path):
    streamer = ScriptedStreamer(free_running=True)
    with redis_server(tmp_path) as url:
        async with gateway(streamer, **FAST_REFUSAL, redis_url=url) as gw, gw.client() as client:
            prediction = await create(client, input={"prompt": "hi", "max_tokens": 2})
            with contextlib.suppress(redis.exceptions.ConnectionError):  # the server closes the connection
                await redis.asyncio.from_url(url).shutdown(nosave=True)
            response = await client.get(prediction["urls"]["get"])
            assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable", response.text
            assert "redis" not in response.text.lower() and "127.0.0.1" not in response.text


async def test_with_api_keys_every_prediction_route_needs_one():
    # The middleware gateway/gateway.py puts in front of every route, over the prediction routes.
    streamer = ScriptedStreamer(free_running=True)
    app = add_prediction_routes(FastAPI(), streamer, ModelInfo(streamer, "test-model"),
                                PredictionSettings.parse({**FAST_REFUSAL, "store": "memory"}))
    app.add_middleware(RequireKey, keys=Keys((b"sesame",)))
    async with serving(app) as (url, _server, _task), httpx.AsyncClient(base_url=url, timeout=60) as client:
        keyed = {"Authorization": "Bearer sesame"}
        response = await client.post(PREDICTIONS, json={"input": {"prompt": "hi", "max_tokens": 2}}, headers=keyed)
        assert response.status_code == 201
        prediction = response.json()
        for method, url_of in [("POST", PREDICTIONS), ("GET", prediction["urls"]["get"]),
                               ("GET", prediction["urls"]["stream"]), ("POST", prediction["urls"]["cancel"])]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                refused = await client.request(method, url_of, headers=headers)
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get(prediction["urls"]["get"], headers=keyed)).status_code == 200


# The SQLite store across a restart -------------------------------------------------------------------------------


async def test_sqlite_keeps_predictions_across_a_restart_and_fails_the_ones_left_running(tmp_path):
    path = tmp_path / "predictions.sqlite3"
    settings = {**FAST_REFUSAL, "sqlite_path": str(path)}
    streamer = ScriptedStreamer()
    async with gateway(streamer, **settings) as gw, gw.client() as client:
        done = await create(client, input={"prompt": "hi", "max_tokens": 4})
        streamer.release(4)
        assert (await poll_to_end(client, done, None))[1]["status"] == "succeeded"
        finished = (await client.get(f"{PREDICTIONS}/{done['id']}")).json()
        assert "".join(finished["output"]) == answer_of(4)
    # A process that died mid-answer: its store's file holds a prediction still processing, with some output.
    died = prediction_store.SQLiteStore(path, ttl_s=3600, max_kept=100)
    await died.start()
    await died.create(prediction_store.Prediction(id="died", model="test-model", version="test-model",
                                                  input={"prompt": "hi"}, created_at=prediction_store.now_iso()))
    await died.update("died", status="processing", started_at=prediction_store.now_iso())
    assert await died.append("died", 0, " Hello")
    await died.close()
    async with gateway(ScriptedStreamer(), **settings) as gw, gw.client() as client:
        again = (await client.get(f"{PREDICTIONS}/{done['id']}")).json()
        assert again == {**finished, "urls": again["urls"]}  # whole: output, metrics, timestamps
        left = (await client.get(f"{PREDICTIONS}/died")).json()
        assert (left["status"], left["error"], left["error_code"]) == ("failed", prediction_store.RESTARTED_ERROR,
                                                                      "unavailable")
        assert left["output"] == [" Hello"] and left["completed_at"]
        events = await read_events(client, f"{PREDICTIONS}/died/stream")
        assert [e["event"] for e in events] == ["output", "error", "done"]


async def test_a_second_gateway_on_the_same_sqlite_file_fails_to_start(tmp_path, monkeypatch):
    monkeypatch.setattr(prediction_store, "LOCK_WAIT_S", 0.2)
    first = prediction_store.SQLiteStore(tmp_path / "p.sqlite3", ttl_s=60, max_kept=10)
    second = prediction_store.SQLiteStore(tmp_path / "p.sqlite3", ttl_s=60, max_kept=10)
    await first.start()
    try:
        with pytest.raises(RuntimeError, match="in use by another gateway"):
            await second.start()
    finally:
        await first.close()
