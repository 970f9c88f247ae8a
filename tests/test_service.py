"""The real flow over gRPC on the tiny model: the seed client, bad input, faults, cancellation, metrics."""

import asyncio
import re
import subprocess
import sys

import pytest
from docarray import DocList

from client import StreamError, stream
from harness import ROOT
from harness.service import (
    FRANCE,
    TINY_LIMITS,
    documents,
    eventually,
    grpc_client,
    seed_client_texts,
    serve,
    stream_docs,
)
from schemas import ModelOutputDocument, PromptDocument


async def test_seed_two_field_client_streams_growing_text(tiny_service):
    texts = await seed_client_texts(tiny_service, FRANCE, max_tokens=10)
    assert 1 <= len(texts) <= 11
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


async def test_last_document_carries_finish_reason_usage_and_timings(tiny_service):
    docs = await stream_docs(tiny_service, prompt="tell me something", max_tokens=8)
    last = docs[-1]
    assert last.finish_reason in ("length", "eos")
    assert all(doc.finish_reason is None for doc in docs[:-1])
    assert [doc.index for doc in docs] == list(range(len(docs)))
    assert last.completion_tokens == len(docs) and last.prompt_tokens > 3
    assert 0 <= last.time_to_first_token_s <= last.total_time_s
    assert "".join(doc.text for doc in docs) == last.generated_text


async def test_unary_endpoint_returns_the_joined_stream(tiny_service):
    docs = await stream_docs(tiny_service, prompt="a unary question", max_tokens=12)
    result = DocList[ModelOutputDocument]()
    async for response in grpc_client(tiny_service.grpc_port).post(
        on="/generate",
        inputs=DocList[PromptDocument]([PromptDocument(prompt="a unary question", max_tokens=12)]),
        return_type=DocList[ModelOutputDocument],
    ):
        result.extend(response)
    assert len(result) == 1
    assert result[0].generated_text == docs[-1].generated_text
    assert result[0].finish_reason == docs[-1].finish_reason


BAD_INPUTS = [
    (dict(prompt="", max_tokens=5), "the prompt is empty"),
    (dict(prompt="   \n\t ", max_tokens=5), "the prompt is empty"),
    (dict(prompt="hi", max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(prompt="hi", max_tokens=-3), "max_tokens must be at least 1, got -3"),
    (dict(prompt="hi", max_tokens=100_000), "exceeds the model's context of 4096 tokens"),
    (dict(prompt="word " * 5_000, max_tokens=5), r"the prompt is \d+ tokens; the model's context is 4096 tokens"),
    # Refused before tokenizing: 16 characters per token of the context.
    (dict(prompt="x" * 70_000, max_tokens=5), "the prompt is 70000 characters; the limit is 65536 characters"),
    (dict(prompt="hi", max_tokens=5, temperature=-1.0), "temperature must be a number >= 0, got -1.0"),
]


@pytest.mark.parametrize("fields, message", BAD_INPUTS)
async def test_bad_input_gets_one_error_document_then_service_streams_normally(tiny_service, fields, message):
    docs = await stream_docs(tiny_service, **fields)
    assert len(docs) == 1, "an error must end the stream at once, never replay it"
    assert docs[0].finish_reason == "error" and re.search(message, docs[0].error)
    with pytest.raises(StreamError, match=message):
        async for _ in stream(port=tiny_service.grpc_port, host="127.0.0.1", **fields):
            pass
    after = await stream_docs(tiny_service, prompt="and now a valid one", max_tokens=4)
    assert after[-1].finish_reason in ("length", "eos")


async def test_it_streams_the_client_holds_a_token_while_generation_still_runs(tiny_service):
    """Streaming, not buffering, without a clock: when the client holds document k, the executor still
    reports that stream running (its generation has not ended yet). 4000 tokens: the tiny model makes 400 faster
    than a loaded machine's gRPC path brings the first document to the client."""
    seen_running = []

    async def consume():
        async for doc in documents(tiny_service, prompt="stream", max_tokens=4000, chat_template=False):
            if doc.index in (0, 1, 2):
                seen_running.append(tiny_service.running_streams())

    task = asyncio.create_task(consume())
    await eventually(lambda: len(seen_running) == 3 or task.done())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert seen_running == [1.0, 1.0, 1.0]
    await eventually(lambda: tiny_service.running_streams() == 0)


async def test_cancelling_the_client_task_frees_the_engine_and_counts_the_cancellations(tiny_service):
    """Each client cancels mid-stream, once it holds a document."""
    received = [0, 0, 0]

    async def consume(i: int):
        async for _ in documents(tiny_service, prompt="long", max_tokens=4000, chat_template=False):
            received[i] += 1

    cancelled = tiny_service.cancelled_requests()
    tasks = [asyncio.create_task(consume(i)) for i in range(3)]
    await eventually(lambda: tiny_service.running_streams() == 3 and min(received) >= 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await eventually(lambda: tiny_service.running_streams() == 0 and tiny_service.cancelled_requests() == cancelled + 3)


async def test_a_client_cancelled_before_its_first_document_frees_the_engine(tiny_service):
    """Cancelled as soon as the engine runs the streams, whether or not the first documents have reached the
    clients: grpc.aio's call start and Jina's dropped generators each lost such cancellations (gateway/relay.py,
    workarounds/grpc_cancel.py, workarounds/jina_worker.py), and the streams ran on to max_tokens."""
    for _ in range(3):
        cancelled = tiny_service.cancelled_requests()
        tasks = [
            asyncio.create_task(stream_docs(tiny_service, prompt=f"early {i}", max_tokens=4000, chat_template=False))
            for i in range(4)
        ]
        await eventually(lambda: tiny_service.running_streams() == 4)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Bound as a default: the predicate reads this round's count, not a later one's.
        await eventually(
            lambda before=cancelled: tiny_service.running_streams() == 0
            and tiny_service.cancelled_requests() == before + 4
        )


async def test_a_killed_client_process_frees_the_engine(tiny_service):
    client = subprocess.Popen(
        [sys.executable, "-m", "client", "long", "--max-tokens", "4000", "--no-chat-template"]
        + ["--port", str(tiny_service.grpc_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: tiny_service.running_streams() == 1)
    finally:
        client.kill()
        client.wait()
    await eventually(lambda: tiny_service.running_streams() == 0)


async def test_overload_gets_an_error_at_once_while_admitted_streams_go_on(tiny_service):
    errors = tiny_service.metric("llm_requests_total", finish_reason="error")
    long_streams = [
        asyncio.create_task(stream_docs(tiny_service, prompt=f"busy {i}", max_tokens=4000, chat_template=False))
        for i in range(TINY_LIMITS["max_running"] + TINY_LIMITS["max_waiting"])
    ]
    await eventually(lambda: (tiny_service.running_streams(), tiny_service.waiting_streams()) == (4, 2))
    refused = await stream_docs(tiny_service, prompt="one too many", max_tokens=5)
    assert len(refused) == 1 and refused[0].finish_reason == "error"
    assert "overloaded" in refused[0].error and "limit 6" in refused[0].error
    assert not any(task.done() for task in long_streams)
    for task in long_streams:
        task.cancel()
    await asyncio.gather(*long_streams, return_exceptions=True)
    await eventually(lambda: tiny_service.running_streams() + tiny_service.waiting_streams() == 0)
    assert tiny_service.metric("llm_requests_total", finish_reason="error") == errors + 1  # the refusal counts


async def test_metrics_count_streams_tokens_and_latencies(tiny_service):
    counts = (
        "llm_time_to_first_token_seconds_count",
        "llm_request_duration_seconds_count",
        "llm_inter_token_latency_seconds_count",
        "llm_generated_tokens_total",
    )
    await eventually(lambda: tiny_service.running_streams() == 0)  # nothing of an earlier test still counting
    before = {name: tiny_service.metric(name) for name in counts}
    results = await asyncio.gather(*(stream_docs(tiny_service, prompt=f"m{i}", max_tokens=6) for i in range(3)))
    after = {name: tiny_service.metric(name) - before[name] for name in counts}
    assert after == {
        "llm_time_to_first_token_seconds_count": 3,
        "llm_request_duration_seconds_count": 3,
        "llm_inter_token_latency_seconds_count": sum(len(docs) - 1 for docs in results),  # one per gap
        "llm_generated_tokens_total": sum(len(docs) for docs in results),
    }
    assert tiny_service.running_streams() == 0


async def test_refused_requests_are_counted_as_errors_and_generate_nothing(tiny_service):
    errors, generated = "llm_requests_total", "llm_generated_tokens_total"
    before = tiny_service.metric(errors, finish_reason="error"), tiny_service.metric(generated)
    await asyncio.gather(
        stream_docs(tiny_service, prompt="", max_tokens=5), stream_docs(tiny_service, prompt="hi", max_tokens=0)
    )
    after = tiny_service.metric(errors, finish_reason="error"), tiny_service.metric(generated)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 0)


def test_command_line_prints_tokens_and_a_summary(tiny_service):
    result = subprocess.run(
        [sys.executable, "-m", "client", "say something", "--max-tokens", "6", "--port", str(tiny_service.grpc_port)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\[\d+ tokens, time to first token \d+ ms, [0-9.]+ tokens/s, finish: (length|eos)\]", summary)


def test_command_line_reports_an_error_and_fails(tiny_service):
    result = subprocess.run(
        [sys.executable, "-m", "client", "hi", "--max-tokens", "0", "--port", str(tiny_service.grpc_port)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "max_tokens must be at least 1" in result.stderr


async def test_a_fault_in_one_stream_ends_it_with_an_error_and_spares_the_others_in_its_batch(
    tmp_path_factory, tiny_model_dir
):
    """tests/faulty_executor.py fails the 3rd token of a FAULT prompt inside a batched decode step. The healthy
    streams are already running when the faulty one starts, so the fault strikes one decode step of all four (its
    fault log says how many streams that step served); the three must then finish with exactly the tokens that
    their prompts give alone (greedy, float32)."""
    healthy_prompts = [f"healthy {i}" for i in range(3)]
    fields = dict(max_tokens=1000, chat_template=False)  # seconds of steps: still running when the fault strikes
    fault_log = tmp_path_factory.mktemp("fault") / "fault.txt"
    uses_with = {"model": str(tiny_model_dir), "dtype": "float32", "fault_log": str(fault_log)}
    with serve(tmp_path_factory, "faulty", uses_with, uses="tests/faulty.yml") as service:
        healthy = [asyncio.create_task(stream_docs(service, prompt=prompt, **fields)) for prompt in healthy_prompts]
        await eventually(lambda: service.running_streams() == len(healthy_prompts))
        faulty = await stream_docs(service, prompt="FAULT here", **fields)
        together = await asyncio.gather(*healthy)
        alone = [await stream_docs(service, prompt=prompt, **fields) for prompt in healthy_prompts]

        assert [d.finish_reason for d in faulty] == [None, None, "error"]
        # The answer names the kind of failure, not its internals.
        assert faulty[-1].error == "internal error while processing a token: RuntimeError"
        assert faulty[-1].error_code == "internal"
        in_its_batch = fault_log.read_text() == "injected fault in a decode step of 4 streams"
        assert in_its_batch, "the others were not in its batch"
        for docs, reference in zip(together, alone):
            assert reference[-1].finish_reason in ("length", "eos")
            assert [d.finish_reason for d in docs] == [d.finish_reason for d in reference]
            assert [d.token_id for d in docs] == [d.token_id for d in reference]
            assert docs[-1].generated_text == reference[-1].generated_text
        await eventually(lambda: service.running_streams() + service.waiting_streams() == 0)
