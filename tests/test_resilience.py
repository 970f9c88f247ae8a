"""Resilience of the real flow (gRPC gateway + executor) on the tiny model, sized for CI: a storm of streams half
of which are cancelled at random points, fuzzed PromptDocuments, bytes no Python client can send. The fault
injected into one stream of a batch is tests/test_service.py's fault test; the long version of all this is
`make soak` (bench/soak.py)."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pydantic
import pytest
from docarray import BaseDoc
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from jina.proto import jina_pb2
from jina.types.request.data import SingleDocumentRequest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from client import stream_documents
from engine.detokenizer import REPLACEMENT_CHAR
from harness.processes import process_listening_on
from harness.service import Service, documents, eventually, grpc_client, serve, stream_docs
from schemas import ModelOutputDocument, PromptDocument

# Room for the whole storm at once (32 decoded together, the rest queued): nothing here is refused as overloaded.
ROOMY_LIMITS = {"dtype": "float32", "max_running": 32, "max_waiting": 128}
CONTEXT = 4096  # the tiny model's max_position_embeddings: prompt + max_tokens limit of the flow below
REQUEST_TIMEOUT_S = 60  # "never a hang": any single request of this file ends well within this


@pytest.fixture(scope="module")
def roomy_service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    with serve(tmp_path_factory, "resilience-flow", {"model": str(tiny_model_dir), **ROOMY_LIMITS}) as service:
        yield service


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """The whole answer as one decode of its tokens, as the service means generated_text: special tokens out, and
    no U+FFFD for the bytes of a character that max_tokens cut (engine/detokenizer.py holds them back)."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.rstrip(REPLACEMENT_CHAR)


def executor_process(service: Service) -> psutil.Process:
    """The executor's own process: the one that listens on its Prometheus port (the gateway is another one)."""
    return process_listening_on(service.monitoring_port)


async def bounded(coroutine, timeout: float = REQUEST_TIMEOUT_S):
    """A request that hangs fails the test (asyncio.TimeoutError) instead of hanging it."""
    return await asyncio.wait_for(coroutine, timeout)


async def assert_healthy(service: Service) -> None:
    docs = await bounded(stream_docs(service, prompt="a normal request", max_tokens=3))
    assert docs[-1].finish_reason in ("length", "eos") and docs[-1].error is None
    assert [d.index for d in docs] == list(range(len(docs)))


# ---- 1. a storm of 100 streams, half of them cancelled at random points ----

STORM_STREAMS = 100
STORM_MAX_TOKENS = 40  # of a stream read to the end; a cancelled one is cancelled after at most this many documents
# A cancelled stream asks for several times more tokens than it reads before it is cancelled, so that it is the
# cancellation that ends it, yet few enough that one whose cancellation Jina's gateway loses (a few per cent of
# them when the client lags behind: SOAK.md's "client cancellations ... counted by the executor") still ends by
# itself well within `eventually`.
CANCELLED_MAX_TOKENS = 160
# Prompts of very different lengths (5 to ~1,800 tokens: up to seven prefill chunks), with and without the chat
# template.
STORM_PROMPTS = [
    (f"storm {i}: " + "the quick brown fox jumps over the lazy dog " * (i * i * 4), i % 2 == 0) for i in range(8)
]
# Resident memory of the executor may grow by at most this much over a storm that follows a warm-up storm. Why
# this figure: over repeated storms (after the warm-up has grown the allocator to a full batch of 32 and the
# longest prompts) the executor's RSS after a storm stayed within 15 MiB of before it (mostly within 4 MiB),
# while during a storm it peaks 50-75 MiB above: the storm's working set (KV caches, ~0.5 KiB per token here,
# ~0.4 MiB per stream; queues, generators, documents). Leaking what the streams held would keep most of that.
# Slower leaks are the soak's job (make soak).
RSS_GROWTH_BOUND = 32 * 2**20


@dataclass
class StormStream:
    prompt: str
    chat_template: bool
    max_tokens: int
    cancel_after: int | None  # cancel the consuming task once it holds this many documents; None: read to the end
    received: list[ModelOutputDocument] = field(default_factory=list)
    reached: asyncio.Event = field(default_factory=asyncio.Event)


def plan_storm(rng: random.Random) -> list[StormStream]:
    cancelled = set(rng.sample(range(STORM_STREAMS), STORM_STREAMS // 2))
    streams = []
    for i in range(STORM_STREAMS):
        prompt, chat_template = STORM_PROMPTS[i % len(STORM_PROMPTS)]
        if i in cancelled:
            # 0: cancelled before any document came (queued, prefilling, or not yet at the executor).
            streams.append(StormStream(prompt, chat_template, CANCELLED_MAX_TOKENS, rng.randint(0, STORM_MAX_TOKENS)))
        else:
            streams.append(StormStream(prompt, chat_template, rng.randint(8, STORM_MAX_TOKENS), None))
    return streams


async def consume(service: Service, stream: StormStream) -> None:
    if stream.cancel_after == 0:
        stream.reached.set()
    fields = dict(prompt=stream.prompt, max_tokens=stream.max_tokens, chat_template=stream.chat_template)
    async for doc in documents(service, **fields):
        stream.received.append(doc)
        if len(stream.received) == stream.cancel_after:
            stream.reached.set()  # and read on: the cancellation lands while the task awaits the next document


async def run_storm(service: Service, streams: list[StormStream]) -> list[asyncio.Task]:
    """Every stream at once; each of the cancelled half is cancelled (its consuming task, as a client does)
    once it holds its `cancel_after` documents. (The task is cancelled while it awaits the stream, as a client
    reading a stream is: that is what cancels the gRPC call. A task cancelled while it awaits something else
    leaves Jina's gRPC call open, even inside `contextlib.aclosing`, and the server generating to max_tokens.)"""
    tasks = [asyncio.create_task(consume(service, stream)) for stream in streams]

    async def cancel_when_reached(stream: StormStream, task: asyncio.Task) -> None:
        reached = asyncio.create_task(stream.reached.wait())
        await asyncio.wait([reached, task], return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        task.cancel()  # a no-op for a stream that ended (eos) before its cancellation point

    cancellers = [cancel_when_reached(s, t) for s, t in zip(streams, tasks) if s.cancel_after is not None]
    await bounded(asyncio.gather(*cancellers, asyncio.gather(*tasks, return_exceptions=True)), timeout=300)
    for task in tasks:
        assert task.cancelled() or task.exception() is None, task.exception()
    return tasks


async def test_a_storm_of_100_streams_half_cancelled_at_random_points(roomy_service, tokenizer):
    service = roomy_service
    # Greedy, float32: each prompt's tokens alone, once, before the storm; every storm stream must give a prefix.
    # As long as a cancelled stream may get: it reads on until its cancellation lands.
    references = {}
    for prompt, chat_template in STORM_PROMPTS:
        docs = await bounded(
            stream_docs(service, prompt=prompt, max_tokens=CANCELLED_MAX_TOKENS, chat_template=chat_template)
        )
        references[prompt] = ([d.token_id for d in docs], docs[-1].finish_reason)
    rng = random.Random(20261124)
    executor = executor_process(service)

    def counted() -> tuple[float, float]:
        """Streams the executor has counted so far: as finished (length, eos), as cancelled."""
        finished = sum(service.metric("llm_requests_total", finish_reason=reason) for reason in ("length", "eos"))
        return finished, service.cancelled_requests()

    finished_at_start, cancelled_at_start = counted()
    totals = {"completed": 0, "cancelled": 0}

    async def storm() -> None:
        streams = plan_storm(rng)
        tasks = await run_storm(service, streams)

        completed = [s for s, t in zip(streams, tasks) if not t.cancelled()]
        cancelled = [s for s, t in zip(streams, tasks) if t.cancelled()]
        # Only a client cancels its stream: every stream read to the end completed (run_storm failed any task that
        # raised; one that ended cancelled was cut off by something other than its client).
        assert [s for s in cancelled if s.cancel_after is None] == [], "a stream nobody cancelled did not complete"
        for stream in completed:
            reference_ids, reference_finish = references[stream.prompt]
            expected_ids = reference_ids[: stream.max_tokens]
            docs = stream.received
            assert [d.token_id for d in docs] == expected_ids, "a completed stream differs from its prompt alone"
            assert [d.index for d in docs] == list(range(len(docs)))
            assert [d.finish_reason for d in docs[:-1]] == [None] * (len(docs) - 1)
            assert docs[-1].finish_reason == (reference_finish if len(reference_ids) <= stream.max_tokens else "length")
            assert docs[-1].generated_text == "".join(d.text for d in docs) == decode(tokenizer, expected_ids)
            assert docs[-1].completion_tokens == len(docs)
        for stream in cancelled:  # what a cancelled client got before it left is the start of the right answer
            reference_ids, _ = references[stream.prompt]
            assert [d.token_id for d in stream.received] == reference_ids[: len(stream.received)]
            assert all(d.finish_reason is None for d in stream.received)

        # Every slot comes back: nothing runs, nothing waits (the waiting gauge is admitted-minus-running, so
        # this also says that admission control counts no stream any more).
        await eventually(lambda: service.running_streams() + service.waiting_streams() == 0)
        # Since the first storm, each stream is counted at most once by the executor, as finished or as cancelled
        # (twice would be a replay), and every completed one as finished. (Not every cancelled one as cancelled:
        # one cancelled before its first document may never have reached the executor, and Jina's gateway loses
        # a few cancellations of lagging clients: those streams run on to max_tokens, and are counted when the
        # gateway's garbage collector closes them, maybe during a later storm: hence totals since the start.)
        totals["completed"] += len(completed)
        totals["cancelled"] += len(cancelled)
        now_finished, now_cancelled = counted()
        finished, counted_cancelled = now_finished - finished_at_start, now_cancelled - cancelled_at_start
        assert finished >= totals["completed"] and counted_cancelled <= totals["cancelled"]
        assert finished + counted_cancelled <= totals["completed"] + totals["cancelled"]

    await storm()  # warm-up: the allocator grows to a full batch and the longest prompts
    rss_before = executor.memory_info().rss
    await storm()
    rss_after = executor.memory_info().rss
    assert rss_after - rss_before <= RSS_GROWTH_BOUND, f"executor RSS grew {(rss_after - rss_before) / 2**20:.1f} MiB"
    await assert_healthy(service)


# ---- 2. fuzzed PromptDocuments over real gRPC ----
#
# What counts as an answer, for any PromptDocument a Python client can build:
#   - a stream: documents indexed 0..n-1, one finish_reason (length, eos or stop) on the last, generated_text
#     equal to the joined `text`s and to one decode of the tokens (up to the stop string for `stop`);
#   - or one error document (finish_reason='error') whose `error` names the field at fault;
#   - or, for what the wire cannot carry, a clear exception on the client before anything is sent: protobuf
#     strings are UTF-8, so a lone surrogate (which a Python str, and so PromptDocument, accepts) fails with
#     "surrogates not allowed"; DocArray sends an int as int32, so max_tokens outside it fails with "max_tokens
#     ... out of range". A non-Python client cannot send a surrogate either: see the raw-bytes test below.
#   - never a hang: every request is bounded by REQUEST_TIMEOUT_S.
# A document missing a required field fails on the client (pydantic names the field); sent by a client with
# its own schema, see test_a_document_without_a_valid_required_field_*.

INT32 = range(-(2**31), 2**31)  # what DocArray's protobuf carries for an int (NodeProto.integer is int32)
RTL_SNIPPETS = [
    "مرحبا بالعالم", "שלום עולם", "\u202eevil\u202c", "\u200f\u200e", "abc \u202b مرحبا \u202c def", "\u2067אב\u2069"
]
# Every code point but surrogates: C0/C1 controls and NUL, format characters (bidi overrides), private use...
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=["Cs"]), max_size=80)
PROMPTS = st.one_of(
    ANY_TEXT,
    st.builds(lambda a, rtl, b: a + rtl + b, ANY_TEXT, st.sampled_from(RTL_SNIPPETS), ANY_TEXT),
    st.sampled_from(["", " ", "\t\n\r ", "\u3000\u00a0\u2028", "\x00", "\x00\x01\x1b[31m\x7f\x9f"]),
    st.builds(lambda a, surrogate, b: a + surrogate + b, ANY_TEXT, st.characters(categories=["Cs"]), ANY_TEXT),
    # long prompts, up to past the context
    st.builds(lambda unit, n: unit * n, st.text(min_size=1, max_size=4), st.integers(500, 12_000)),
)
MAX_TOKENS = st.one_of(
    st.integers(1, 12),  # a real stream (a short one: the test stays fast), half of the time
    st.integers(1, 12),
    st.integers(max_value=0),  # zero, negative, down to far below int32
    st.integers(min_value=CONTEXT),  # more than any prompt leaves room for, up to far beyond int64
)
REQUIRED = {"prompt": PROMPTS, "max_tokens": MAX_TOKENS}
OPTIONAL = {
    "stop": st.none() | st.lists(st.text(st.characters(codec=None), max_size=4), max_size=3),
    "chat_template": st.booleans(),
}
# Three documents in four carry both required fields; the fourth may lack one.
FIELDS = st.sampled_from([True, True, True, False]).flatmap(
    lambda complete: st.fixed_dictionaries(REQUIRED, optional=OPTIONAL)
    if complete
    else st.fixed_dictionaries({}, optional={**REQUIRED, **OPTIONAL})
)


def unsendable(fields: dict) -> list[str]:
    """What the client must refuse to serialize, as patterns of its exception's message."""
    problems = []
    texts = [fields.get("prompt", ""), *(fields.get("stop") or ())]
    if any(0xD800 <= ord(c) <= 0xDFFF for text in texts for c in text):
        problems.append("surrogates not allowed")
    if fields["max_tokens"] not in INT32:
        problems.append("max_tokens.*out of range")
    return problems


def assert_context_error(error: str, max_tokens: int) -> None:
    """The refusal of a prompt + max_tokens that do not fit must say so with numbers that add up."""
    too_long = re.search(r"the prompt is (\d+) tokens; the model's context is (\d+) tokens", error)
    too_many = re.search(
        r"prompt \((\d+) tokens\) \+ max_tokens \((-?\d+)\) exceeds the model's context of (\d+)", error
    )
    assert too_long or too_many, error
    if too_long:
        assert int(too_long[1]) >= int(too_long[2]) == CONTEXT
    else:
        assert int(too_many[2]) == max_tokens and int(too_many[1]) + max_tokens > int(too_many[3]) == CONTEXT


def assert_correct_stream(docs: list[ModelOutputDocument], fields: dict, tokenizer: PreTrainedTokenizerBase) -> None:
    last = docs[-1]
    assert last.finish_reason in ("length", "eos", "stop"), (last.finish_reason, last.error)
    assert all(d.token_id >= 0 for d in docs) and last.completion_tokens == len(docs) <= fields["max_tokens"]
    assert last.finish_reason != "length" or len(docs) == fields["max_tokens"]
    assert last.generated_text == "".join(d.text for d in docs)
    whole = decode(tokenizer, [d.token_id for d in docs])
    if last.finish_reason == "stop":
        assert whole.startswith(last.generated_text)
    else:
        assert last.generated_text == whole
    for stop in fields.get("stop") or ():
        assert not stop or stop not in last.generated_text, "a stop string was sent"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fields=FIELDS)
@example(fields={"prompt": "word " * 5000, "max_tokens": 5})  # the prompt alone is past the context
@example(fields={"prompt": "\u202eمرحبا\u202c hello \x00", "max_tokens": 12, "stop": ["e", " "]})
@example(fields={"prompt": "a\ud800b", "max_tokens": 3})  # a lone surrogate
@example(fields={"prompt": "", "max_tokens": 1, "stop": ["\ud800"]})  # one in a stop string
@example(fields={"prompt": "hi", "max_tokens": 2**63 - 1})
@example(fields={"prompt": "hi", "max_tokens": -(2**31)})
@example(fields={"max_tokens": 2**31})  # no prompt, and a max_tokens the client cannot send: the client says so
async def test_any_prompt_document_gets_a_stream_or_a_clear_error_and_the_service_stays_healthy(
    roomy_service, tokenizer, fields
):
    service = roomy_service
    if "max_tokens" not in fields:
        event("refused by the client: a required field is missing")
        with pytest.raises(pydantic.ValidationError, match="max_tokens"):
            PromptDocument(**fields)
        return
    problems = unsendable(fields)
    if "prompt" not in fields and not problems:  # optional beside `messages`: the executor asks for one of them
        event("refused by the executor: neither prompt nor messages")
        docs = await bounded(stream_docs(service, **fields))
        assert len(docs) == 1 and docs[0].error_code == "invalid_request" and "`prompt`" in docs[0].error
        return
    if problems:
        event("refused by the client: not sendable")
        with pytest.raises(Exception) as refused:
            await bounded(stream_docs(service, **fields))
        assert not isinstance(refused.value, asyncio.TimeoutError)
        assert any(re.search(problem, str(refused.value)) for problem in problems), repr(refused.value)
    else:
        docs = await bounded(stream_docs(service, **fields))
        assert docs, "the stream ended without a single document"
        assert [d.index for d in docs] == list(range(len(docs))), "a stream was replayed or reordered"
        assert [d.finish_reason for d in docs[:-1]] == [None] * (len(docs) - 1)
        prompt, max_tokens = fields["prompt"], fields["max_tokens"]
        if docs[-1].finish_reason == "error":
            error = docs[-1].error
            event(f"error document: {re.sub(r'-?[0-9]+', 'N', error)[:40]}")
            assert len(docs) == 1 and error
            if not prompt.strip():
                assert "the prompt is empty" in error
            elif max_tokens < 1:
                assert f"max_tokens must be at least 1, got {max_tokens}" in error
            elif "after tokenization" not in error:  # ("the prompt is empty after tokenization" names it too)
                assert_context_error(error, max_tokens)
        else:
            event(f"stream, finish_reason={docs[-1].finish_reason}")
            assert prompt.strip() and max_tokens >= 1, "an invalid request was served"
            assert_correct_stream(docs, fields, tokenizer)
    await assert_healthy(service)


# ---- 3. what only a non-Python client (or a broken one) can send ----

STREAM_DOC_METHOD = "/jina.JinaSingleDocumentRequestRPC/stream_doc"  # Jina's gRPC stream_doc, as its client calls it


def stream_doc_request(prompt: PromptDocument) -> bytes:
    """The bytes Jina's client sends for `stream_doc(on='/stream', inputs=prompt)`."""
    request = SingleDocumentRequest()
    request.header.exec_endpoint = "/stream"
    request.document_cls = PromptDocument
    request.data.doc = prompt
    return request.proto.SerializeToString()


def raw_stream_doc(channel: grpc.aio.Channel, request: bytes) -> grpc.aio.UnaryStreamCall:
    call = channel.unary_stream(
        STREAM_DOC_METHOD,
        request_serializer=lambda data: data,
        response_deserializer=jina_pb2.SingleDocumentRequestProto.FromString,
    )
    return call(request)


@pytest.mark.parametrize(
    "bad_bytes",
    # a lone surrogate (U+D800 as CESU-8), a byte UTF-8 never uses, a cut sequence
    [b"\xed\xa0\x80", b"\xff", b"\xc3("],
)
async def test_prompt_bytes_that_are_not_utf8_are_refused_by_the_gateway(roomy_service, bad_bytes: bytes):
    """A client in another language can put any bytes in the prompt's protobuf string: the gateway refuses the
    request with a gRPC error that names the parse failure, and serves the next one."""
    marker = "@" * len(bad_bytes)
    request = stream_doc_request(PromptDocument(prompt=f"before {marker} after", max_tokens=3))
    assert request.count(marker.encode()) == 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{roomy_service.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await bounded(raw_stream_doc(channel, request.replace(marker.encode(), bad_bytes)).read())
        # The same bytes with valid UTF-8 go through: it is the encoding that is refused, not the raw call.
        valid = await bounded(raw_stream_doc(channel, request).read())
    assert "Error parsing message" in refused.value.details(), refused.value.details()
    assert ModelOutputDocument.from_protobuf(valid.document).token_id >= 0
    await assert_healthy(roomy_service)


# ---- 4. documents of another schema: a required field missing or of the wrong type ----


class PromptOnly(BaseDoc):
    prompt: str


class MaxTokensOnly(BaseDoc):
    max_tokens: int


class Nothing(BaseDoc):
    pass


class TextMaxTokens(BaseDoc):
    prompt: str
    max_tokens: str


MALFORMED = [
    (PromptOnly(prompt="hello"), "max_tokens"),
    (MaxTokensOnly(max_tokens=5), "prompt"),
    (Nothing(), "max_tokens"),
    (TextMaxTokens(prompt="hello", max_tokens="five"), "max_tokens"),
]


async def send(service: Service, doc: BaseDoc) -> list[ModelOutputDocument]:
    """Every document of one stream_doc call with a document of any schema, bounded."""

    async def collect() -> list[ModelOutputDocument]:
        return [d async for d in stream_documents(grpc_client(service.grpc_port), doc)]

    return await bounded(collect())


@pytest.mark.parametrize("doc, field", MALFORMED, ids=[type(doc).__name__ for doc, _ in MALFORMED])
async def test_a_document_without_a_valid_required_field_neither_hangs_nor_harms_the_service(roomy_service, doc, field):
    await send(roomy_service, doc)
    await assert_healthy(roomy_service)
    await eventually(lambda: roomy_service.running_streams() + roomy_service.waiting_streams() == 0)


@pytest.mark.parametrize("doc, field", MALFORMED, ids=[type(doc).__name__ for doc, _ in MALFORMED])
async def test_a_document_without_a_valid_required_field_gets_an_error_naming_it(roomy_service, doc, field):
    """The gateway reads the document as the executor's worker would (gateway/validation.py): without it, the
    worker's parse failure reached the gateway as a broken connection and the client got an empty stream."""
    docs = await send(roomy_service, doc)
    assert len(docs) == 1, f"expected one error document, got {len(docs)} documents"
    assert docs[0].finish_reason == "error" and f"`{field}`" in docs[0].error, docs[0].error
    if field == "max_tokens":  # the gateway names what PromptDocument expects there
        assert "of type int" in docs[0].error, docs[0].error
    else:  # `prompt` is optional beside `messages`: the executor asks for one of them
        assert "`messages`" in docs[0].error, docs[0].error


class PromptWithExtras(BaseDoc):
    """Another client's schema: PromptDocument's required fields, a field PromptDocument lacks, one it has."""

    prompt: str
    max_tokens: int
    user: str = "someone"
    seed: int = 3


async def test_a_document_of_another_schema_with_the_required_fields_and_extra_ones_gets_its_stream(roomy_service):
    docs = await send(roomy_service, PromptWithExtras(prompt="hello", max_tokens=4))
    assert [d.index for d in docs] == list(range(len(docs))) and docs[-1].finish_reason in ("length", "eos")
    assert all(d.token_id >= 0 for d in docs) and docs[-1].error is None


# ---- 5. a sampling setting the engine cannot use ----


async def test_a_temperature_that_is_not_a_number_gets_an_error_and_the_service_serves_on(roomy_service):
    # This request once killed the engine thread: every later stream hung.
    docs = await bounded(stream_docs(roomy_service, prompt="hello", max_tokens=5, temperature=float("nan")), timeout=5)
    assert len(docs) == 1 and docs[0].finish_reason == "error" and "temperature" in docs[0].error
    await assert_healthy(roomy_service)
