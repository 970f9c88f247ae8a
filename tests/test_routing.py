"""Prefix-affine routing (gateway/routing.py, workarounds/jina_routing.py): on a real flow with 2 replicas the
turns of a conversation land on one replica and find their history in its prefix cache, conversations spread
over both, a full replica sends the turn to the other, and an unreachable one leaves the stream to the next."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import openai
import pytest
from jina.logging.logger import JinaLogger
from jina.serve.networking import GrpcConnectionPool
from jina.types.request.data import SingleDocumentRequest

from gateway.routing import TEXT_KEY_CHARS, Route, affinity_key
from harness import ROOT
from harness.http import sdk
from harness.processes import free_ports, running_flow, write_flow
from harness.service import Service, documents, eventually, serve
from schemas import ChatMessage, ModelOutputDocument, PromptDocument
from workarounds import jina_routing

SYSTEM = "You are a terse assistant."
FOLLOW_UPS = ["Tell me more.", "Why?"]
TURN_TOKENS = 4
HOLD_TOKENS = 3000  # a stream that holds its replica's one slot until the test lets it go (paced: 30 s at least)
BLOCK = 8  # the executor's default prefix_block_size: a cached prefix is a whole number of blocks


def opening(conversation: int) -> list[dict]:
    question = f"Conversation {conversation}: tell me about the number {conversation}."
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def chat(*messages: tuple[str, str]) -> PromptDocument:
    return PromptDocument(messages=[ChatMessage(role=r, content=c) for r, c in messages], max_tokens=1)


def test_the_key_is_the_conversations_opening_not_its_system_prompt_alone():
    turn_1 = chat(("system", SYSTEM), ("user", "Explain tides."))
    turn_2 = chat(("system", SYSTEM), ("user", "Explain tides."), ("assistant", "The moon."), ("user", "More?"))
    other = chat(("system", SYSTEM), ("user", "Explain rainbows."))
    assert affinity_key(turn_1) == affinity_key(turn_2) != affinity_key(other)
    assert affinity_key(chat(("user", "Explain tides."))) != affinity_key(turn_1)  # the system prompt counts too
    text = "x" * TEXT_KEY_CHARS
    assert affinity_key(PromptDocument(prompt=text + " and more", max_tokens=1)) == affinity_key(
        PromptDocument(prompt=text + " and else", max_tokens=1)
    )
    assert affinity_key(PromptDocument(prompt="Explain tides.", max_tokens=1)) != affinity_key(turn_1)


def test_a_route_names_each_replica_once_in_its_keys_order_before_naming_any_again():
    addresses = ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]
    route = Route(b"a conversation")
    named = [route.choose(addresses) for _ in range(3)]
    assert sorted(named) == addresses and not route.untried
    assert route.choose(addresses) == named[0]
    again = Route(b"a conversation")
    assert again.untried is False  # asked nothing yet: nothing to say about replicas
    assert again.choose(list(reversed(addresses))) == named[0]  # the order of the key, not of the list
    assert again.untried


def replica_counts(service: Service) -> list[float]:
    return [service.metric("llm_generated_tokens_total", replica=r) for r in range(2)]


async def served_by(service: Service, before: list[float]) -> int:
    """The replica that served the one request finished since `before` (the executor counts it a moment after
    its last document leaves)."""
    await eventually(lambda: replica_counts(service) != before)
    after = replica_counts(service)
    [replica] = [r for r in range(2) if after[r] != before[r]]
    return replica


async def ask(service: Service, messages: list[dict]) -> tuple[openai.types.chat.ChatCompletion, int]:
    """One unary chat turn over the OpenAI API, and the replica that served it."""
    before = replica_counts(service)
    # Closed here: with the clients left to the garbage collector, the next test's gRPC streams in this process
    # (tests/test_lifecycle.py's replicas test, then this module's own) waited forever for their end.
    async with sdk(service) as client:
        completion = await client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=TURN_TOKENS, temperature=0  # type: ignore[arg-type]
        )
    return completion, await served_by(service, before)


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    """2 replicas of the tiny model that take one stream each and queue none, every token paced: a stream holds
    its replica full for as long as the test keeps it open."""
    uses_with = {"model": str(tiny_model_dir), "dtype": "float32", "max_running": 1, "max_waiting": 0, "pace_s": 0.01}
    with serve(tmp_path_factory, "routing-flow", uses_with, "tests/paced.yml", replicas=2) as service:
        yield service


async def test_the_turns_of_a_conversation_land_on_one_replica_and_find_their_history_cached(two_replicas):
    service = two_replicas
    histories: list[list[dict]] = []
    replicas: list[list[int]] = []
    previous_prompts: list[int] = []  # each conversation's last prompt, in tokens
    # Until both replicas have conversations, and an odd number of them: Jina's round robin would send each of an
    # even number of conversations, asked in turn, to the same replica every round.
    while len(set(r[0] for r in replicas)) < 2 or len(histories) < 5 or len(histories) % 2 == 0:
        assert len(histories) < 16, f"every conversation went to one replica: {replicas}"
        histories.append(opening(len(histories)))
        completion, replica = await ask(service, histories[-1])
        histories[-1].append({"role": "assistant", "content": completion.choices[0].message.content})
        replicas.append([replica])
        assert completion.usage is not None
        previous_prompts.append(completion.usage.prompt_tokens)
    cached: list[list[tuple[int, int | None]]] = [[] for _ in histories]  # (previous prompt, cached) per turn
    for follow_up in FOLLOW_UPS:
        for i, (history, served) in enumerate(zip(histories, replicas)):
            history.append({"role": "user", "content": follow_up})
            completion, replica = await ask(service, history)
            served.append(replica)
            history.append({"role": "assistant", "content": completion.choices[0].message.content})
            assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
            cached[i].append((previous_prompts[i], completion.usage.prompt_tokens_details.cached_tokens))
            previous_prompts[i] = completion.usage.prompt_tokens
    assert all(len(set(served)) == 1 for served in replicas), f"replicas per turn of each conversation: {replicas}"
    # Each turn found at least the whole of the turn before it cached, to the last whole block.
    assert all(now is not None and now >= before // BLOCK * BLOCK for turns in cached for before, now in turns), cached


async def test_a_full_replica_sends_the_turn_to_the_other_and_all_full_refuse(two_replicas):
    service = two_replicas
    history = opening(100)
    completion, home = await ask(service, history)
    history.append({"role": "assistant", "content": completion.choices[0].message.content})
    other = 1 - home

    def running(replica: int) -> float:
        return service.metric("llm_running_streams", replica=replica)

    async def hold() -> None:  # over gRPC, with the conversation's opening: the same key as its turns over HTTP
        async for _ in documents(service, messages=opening(100), max_tokens=HOLD_TOKENS):
            pass

    holders = [asyncio.create_task(hold())]
    try:
        await eventually(lambda: running(home) == 1)
        history.append({"role": "user", "content": FOLLOW_UPS[0]})
        completion, replica = await ask(service, history)  # home refuses it as overloaded: the other serves it
        assert replica == other and completion.choices[0].finish_reason == "length"
        history.append({"role": "assistant", "content": completion.choices[0].message.content})

        holders.append(asyncio.create_task(hold()))  # home refuses it: the other takes it, and is full too
        await eventually(lambda: running(other) == 1)
        history.append({"role": "user", "content": FOLLOW_UPS[1]})
        with pytest.raises(openai.RateLimitError) as refused:
            async with sdk(service) as client:
                await client.chat.completions.create(
                    model="test-model", messages=history, max_tokens=TURN_TOKENS  # type: ignore[arg-type]
                )
        assert refused.value.code == "overloaded"
        assert all(not holder.done() for holder in holders)
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    await eventually(lambda: running(home) == running(other) == 0)


async def stream_past_unreachable(dead: str, live: str) -> list[int]:
    """One stream through Jina's connection pool (the gateway's) to replicas `dead` and `live`, routed by a key whose
    first replica is `dead`: the indexes of the documents it got back. Asserts that the route named both."""
    jina_routing.install()
    pool = GrpcConnectionPool(runtime_name="test-routing", logger=JinaLogger("test-routing"))
    for address in (dead, live):
        pool.add_connection(deployment="llm", address=address, head=True)
    key = next(k for k in (f"key {i}".encode() for i in range(100)) if Route(k).choose([dead, live]) == dead)
    route = Route(key)
    request = SingleDocumentRequest()
    request.document_cls = PromptDocument
    request.data.doc = PromptDocument(prompt="hello", max_tokens=3, chat_template=False)
    request.header.exec_endpoint = "/stream"
    stream = pool.send_single_document_request(request=request, deployment="llm", head=True, endpoint="/stream")
    assert stream is not None
    responses = [response async for response, _ in jina_routing.routed(stream, route.choose)]
    await pool.close()
    assert not route.untried  # it named the dead replica first, then the live one
    docs = [ModelOutputDocument.from_protobuf(response.proto.document) for response in responses]
    assert docs[-1].finish_reason == "length"
    return [doc.index for doc in docs]


async def test_an_unreachable_replica_leaves_the_stream_to_the_keys_next_one(tmp_path, tiny_model_dir):
    """Jina's own retry after UNAVAILABLE asks for another connection: the route gives the next replica in its
    key's order (naming the unreachable one forever would hang the event loop in Jina's loop)."""
    grpc_port, executor_port = free_ports(2)
    executor = {"name": "llm", "uses": str(ROOT / "config.yml"), "port": executor_port,
                "uses_with": {"model": str(tiny_model_dir), "dtype": "float32"}}  # fmt: skip
    flow_file = write_flow(tmp_path / "flow.yml", grpc_port, executor)
    # Bound and never listening: connections are refused, and no other process can take the port meanwhile.
    with socket.socket() as unreachable, running_flow(flow_file, [grpc_port, executor_port], tmp_path / "flow.log"):
        unreachable.bind(("127.0.0.1", 0))
        dead, live = f"127.0.0.1:{unreachable.getsockname()[1]}", f"127.0.0.1:{executor_port}"
        assert await stream_past_unreachable(dead, live) == [0, 1, 2]
