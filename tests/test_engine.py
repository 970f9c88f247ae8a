"""The engine in-process: batching, stop conditions, cancellation, admission control."""

import asyncio
import threading

import pytest
import torch

from engine import (
    EngineConfig,
    ErrorCode,
    FinishReason,
    InvalidRequest,
    LLMEngine,
    SamplingParams,
    load_model,
)
from engine.fast import cpu_kernels
from harness.service import eventually

PROMPTS = [
    "what is the capital of France ?",
    "Write a poem about the sea.",
    "Explain gravity to a child.",
    "List three colors.",
    "Who wrote Hamlet?",
    "Tell me a joke about cats.",
    "How do airplanes fly?",
    "Give me a recipe for pancakes.",
]


async def collect(engine: LLMEngine, prompt: str, **params):
    params.setdefault("max_tokens", 24)
    return [o async for o in engine.generate(engine.processor.tokenize(prompt), SamplingParams(**params))]


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "transformers"])
def fast_path(request) -> bool:
    """Every engine test runs on both runners: the compact fast path (engine/fast/) and the transformers model."""
    return request.param


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir, fast_path):
    config = EngineConfig(max_running=4, max_waiting=2, prefill_chunk=16, fast_path=fast_path)
    engine = LLMEngine(load_model(str(tiny_model_dir), dtype="float32"), config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def embedded_engine(embedded_dir, fast_path):
    engine = LLMEngine(load_model("embedded", dtype="float32"), EngineConfig(max_running=16, fast_path=fast_path))
    yield engine
    engine.close()


async def test_one_output_per_step_until_max_tokens(tiny_engine):
    outputs = await collect(tiny_engine, "hello there", max_tokens=12)
    assert [o.index for o in outputs] == list(range(len(outputs)))
    last = outputs[-1]
    assert last.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert all(o.finish_reason is None for o in outputs[:-1])
    if last.finish_reason is FinishReason.LENGTH:
        assert len(outputs) == 12
    assert last.completion_tokens == len(outputs)
    assert last.prompt_tokens == len(tiny_engine.processor.tokenize("hello there"))
    text = tiny_engine.tokenizer.decode([o.token_id for o in outputs], skip_special_tokens=True)
    assert "".join(o.text for o in outputs) == last.generated_text == text
    assert last.time_to_first_token_s <= last.total_time_s


async def test_long_prompt_is_prefilled_in_chunks_and_equals_one_shot(tiny_engine, tiny_model_dir, fast_path):
    """prefill_chunk=16 splits a long prompt over several steps; the result must not change."""
    prompt = "count with me: " + " ".join(str(i) for i in range(60))
    chunked = await collect(tiny_engine, prompt, max_tokens=16)
    one_shot = LLMEngine(
        load_model(str(tiny_model_dir), dtype="float32"), EngineConfig(prefill_chunk=4096, fast_path=fast_path)
    )
    try:
        assert [o.token_id for o in await collect(one_shot, prompt, max_tokens=16)] == [o.token_id for o in chunked]
    finally:
        one_shot.close()


async def test_greedy_output_is_the_same_alone_inside_a_batch_of_16_and_in_plain_generate(embedded_engine):
    """Batched prefill, the chat template's cached system turn, padding and batched decode change nothing in fp32."""
    alone = {p: await collect(embedded_engine, p, max_tokens=32) for p in PROMPTS[:3]}
    batch = await asyncio.gather(*(collect(embedded_engine, PROMPTS[i % 8], max_tokens=32) for i in range(16)))
    for i, outputs in enumerate(batch[:3]):
        assert [o.token_id for o in outputs] == [o.token_id for o in alone[PROMPTS[i]]]
    assert alone[PROMPTS[0]][-1].generated_text == "The capital of France is Paris."
    model = load_model("embedded", dtype="float32").model
    for prompt, outputs in alone.items():
        prompt_ids = embedded_engine.processor.tokenize(prompt)
        reference = model.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)[0, len(prompt_ids) :]
        assert [o.token_id for o in outputs] == reference.tolist()


async def test_under_dtype_auto_a_greedy_answer_is_the_same_alone_and_among_15_others(embedded_dir):
    """The settings `make serve` uses: whatever precisions start-up measures fastest here, a stream's tokens must
    not depend on the streams beside it (its prefill's group, the decode batch's size). Exact where the C kernels
    decode; where they cannot run, torch's kernels decode and block by the batch size."""
    if cpu_kernels.library() is None:
        pytest.skip(f"decode steps on torch's kernels here, exact only per batch size: {cpu_kernels.unsupported()}")
    engine = LLMEngine(load_model("embedded"), EngineConfig(max_running=16))
    try:
        prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(16)]
        alone = [await collect(engine, prompt, max_tokens=48) for prompt in prompts]
        together = await asyncio.gather(*(collect(engine, prompt, max_tokens=48) for prompt in prompts))
        for prompt, one, many in zip(prompts, alone, together):
            assert [o.token_id for o in many] == [o.token_id for o in one], (prompt, engine.runner.describe())
    finally:
        engine.close()


async def test_under_dtype_auto_the_prefix_cache_changes_no_token_of_a_conversation(embedded_dir):
    """The settings `make serve` uses, the prefix cache on and off: 4 conversations at once, each turn resending
    the history with the answer it got, get the same greedy tokens, and every later turn reports the history it
    found cached. Exact where the C kernels run (they compute each token alone, in any chunk)."""
    if cpu_kernels.library() is None:
        pytest.skip(f"prefills on torch's kernels here, which depend on the chunk: {cpu_kernels.unsupported()}")

    async def conversation(engine: LLMEngine, index: int) -> list[tuple[list[int], int]]:
        messages = [{"role": "system", "content": "You answer in one sentence."}]
        turns = []
        for question in PROMPTS[index : index + 3]:
            messages.append({"role": "user", "content": question})
            prompt_ids = engine.processor.prepare(messages, SamplingParams(max_tokens=24))
            outputs = [o async for o in engine.generate(prompt_ids, SamplingParams(max_tokens=24))]
            turns.append(([o.token_id for o in outputs], outputs[-1].cached_tokens))
            messages.append({"role": "assistant", "content": outputs[-1].generated_text})
        return turns

    results = {}
    for budget in (0, 64):
        engine = LLMEngine(load_model("embedded"), EngineConfig(max_running=8, prefix_cache_mib=budget))
        try:
            results[budget] = await asyncio.gather(*(conversation(engine, index) for index in range(4)))
        finally:
            engine.close()
    for off, on in zip(results[0], results[64]):
        assert [tokens for tokens, _ in on] == [tokens for tokens, _ in off]
        assert all(cached == 0 for _, cached in off)
        assert all(cached >= 32 for _, cached in on[1:])  # the system turn and the first question at least


async def test_prompts_without_the_chat_template_are_prefilled_together_correctly(embedded_engine):
    """Without the chat template prompts share no start: prompts of different lengths are padded side by side."""

    async def raw(prompt: str) -> list[int]:
        prompt_ids = embedded_engine.processor.tokenize(prompt, chat_template=False)
        return [o.token_id async for o in embedded_engine.generate(prompt_ids, SamplingParams(max_tokens=16))]

    alone = [await raw(p) for p in PROMPTS]
    assert await asyncio.gather(*(raw(p) for p in PROMPTS)) == alone


async def test_stop_string_ends_generation_and_is_not_sent(embedded_engine):
    outputs = await collect(embedded_engine, PROMPTS[0], stop=["Paris"])
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert outputs[-1].generated_text == "The capital of France is "


async def test_seeded_sampling_is_reproducible_and_differs_from_greedy(embedded_engine):
    prompt = "Write one sentence about a dragon."
    a = await collect(embedded_engine, prompt, temperature=1.0, top_p=0.9, seed=7, max_tokens=20)
    b = await collect(embedded_engine, prompt, temperature=1.0, top_p=0.9, seed=7, max_tokens=20)
    greedy = await collect(embedded_engine, prompt, max_tokens=20)
    assert [o.token_id for o in a] == [o.token_id for o in b]
    assert [o.token_id for o in a] != [o.token_id for o in greedy]


async def test_cancelled_consumer_frees_its_slot(tiny_engine):
    async def consume_forever():
        async for _ in tiny_engine.generate(tiny_engine.processor.tokenize("go on"), SamplingParams(max_tokens=400)):
            pass

    tasks = [asyncio.create_task(consume_forever()) for _ in range(3)]
    await eventually(lambda: tiny_engine.num_running == 3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await eventually(lambda: tiny_engine.num_running == 0 and tiny_engine.num_waiting == 0)
    steps = tiny_engine.steps
    await asyncio.sleep(0.2)
    assert tiny_engine.steps == steps  # nothing is computed for the streams that left
    assert len(await collect(tiny_engine, "still serving", max_tokens=5)) >= 1


async def test_overload_is_refused_at_once_and_others_complete(tiny_engine):
    """max_running=4, max_waiting=2: the 7th concurrent stream is refused with a clear error."""
    started = [
        tiny_engine.generate(tiny_engine.processor.tokenize(f"stream {i}"), SamplingParams(max_tokens=60))
        for i in range(6)
    ]
    firsts = await asyncio.gather(*(anext(s) for s in started[:4]))  # these four are running
    waiting = [asyncio.create_task(anext(s)) for s in started[4:]]
    await eventually(lambda: tiny_engine.num_waiting == 2)
    refused = await collect(tiny_engine, "one too many")
    assert [o.finish_reason for o in refused] == [FinishReason.ERROR]
    # Transports map the code to a status (HTTP 429, retry later).
    assert refused[0].error_code is ErrorCode.OVERLOADED and "limit 6" in refused[0].error
    rests = await asyncio.gather(*waiting)  # the queued two start once slots free up
    lasts = [[o async for o in stream][-1] for stream in started]
    assert [(o.index, o.token_id >= 0, o.finish_reason) for o in firsts + rests] == [(0, True, None)] * 6
    assert all(o.finish_reason in (FinishReason.LENGTH, FinishReason.EOS) and o.error is None for o in lasts)
    await eventually(lambda: tiny_engine.num_running == 0)


@pytest.mark.parametrize(
    "prompt_tokens, max_tokens, message",
    [
        (0, 5, "the prompt is empty"),
        (5, 0, "max_tokens must be at least 1, got 0"),
        (5, 5000, "exceeds the model's context of 4096 tokens: max_tokens can be at most 4091"),
        (5000, 1, "the prompt is 5000 tokens; the model's context is 4096 tokens"),
    ],
)
def test_requests_beyond_the_limits_are_rejected_with_the_limit_named(tiny_engine, prompt_tokens, max_tokens, message):
    with pytest.raises(InvalidRequest, match=message):
        tiny_engine.processor.check([1] * prompt_tokens, SamplingParams(max_tokens=max_tokens))


async def test_closing_the_engine_ends_every_stream_with_shutdown(tiny_model_dir, fast_path):
    engine = LLMEngine(load_model(str(tiny_model_dir), dtype="float32"), EngineConfig(fast_path=fast_path))
    stream = engine.generate(engine.processor.tokenize("go"), SamplingParams(max_tokens=4000))
    first = await anext(stream)
    engine.close()
    rest = [o async for o in stream]
    assert first.finish_reason is None and rest[-1].finish_reason is FinishReason.SHUTDOWN
    assert (await collect(engine, "too late"))[-1].finish_reason is FinishReason.SHUTDOWN


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"temperature": float("nan")}, "temperature must be a number >= 0, got nan"),
        ({"temperature": float("inf")}, "temperature must be a number >= 0, got inf"),
        ({"temperature": -0.5}, "temperature must be a number >= 0, got -0.5"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ],
)
def test_sampling_settings_that_cannot_be_used_are_rejected(tiny_engine, sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        tiny_engine.processor.check([1, 2, 3], SamplingParams(max_tokens=4, **sampling))


async def test_a_failing_step_ends_the_streams_in_flight_with_an_error_and_the_engine_serves_on(
    tiny_engine, monkeypatch
):
    decode = tiny_engine.runner.decode
    failed = []

    def decode_failing_once(request_ids, input_ids):
        if not failed:
            failed.append(len(request_ids))
            raise RuntimeError("injected decode failure")
        return decode(request_ids, input_ids)

    monkeypatch.setattr(tiny_engine.runner, "decode", decode_failing_once)
    streams = await asyncio.gather(*(collect(tiny_engine, p, max_tokens=8) for p in PROMPTS[:3]))
    errors = [outputs[-1].error for outputs in streams if outputs[-1].finish_reason is FinishReason.ERROR]
    # The rows decoded in the failing step end with the error; the streams prefilled after it complete.
    assert len(errors) == failed[0] >= 1
    # The answer names the failure's kind, not its internals (which the log has).
    assert all(error == "internal error in the engine: RuntimeError" for error in errors)
    assert all(outputs[-1].error_code is ErrorCode.INTERNAL for outputs in streams if outputs[-1].error)
    assert tiny_engine.num_running == 0
    after = await collect(tiny_engine, PROMPTS[0], max_tokens=8)
    assert after[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS) and after[-1].error is None


async def test_a_tiny_temperature_samples_the_most_likely_token(tiny_engine):
    """logits / 2e-39 overflowed to inf and made the sampler raise; the limit of a tiny temperature is greedy."""
    greedy = await collect(tiny_engine, PROMPTS[1], max_tokens=8)
    tiny = await collect(tiny_engine, PROMPTS[1], max_tokens=8, temperature=2.1e-39, seed=3)
    assert tiny[-1].error is None
    assert [o.token_id for o in tiny] == [o.token_id for o in greedy]


@pytest.mark.parametrize(
    "max_decode_pause_s, steps_after_the_burst",
    [
        (60.0, ["prefill", "prefill", "prefill", "decode"]),
        (0.0, ["prefill", "decode", "prefill", "decode", "prefill", "decode"]),
    ],
    ids=["prefill-first", "alternating-once-the-pause-is-spent"],
)
async def test_a_burst_of_arrivals_is_prefilled_before_the_running_stream_decodes_again(
    tiny_model_dir, fast_path, max_decode_pause_s, steps_after_the_burst
):
    """Three prompts arrive while one stream runs; the budget fits one prompt per prefill step. Within the pause
    bound, all three get their first token before the running stream's next step; with no pause allowed, the
    running stream gets a token between any two prefills."""
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    burst = [loaded.tokenizer(p)["input_ids"] for p in ("red green blue", "one two three", "cat dog cow")]
    assert 2 * min(map(len, burst)) > max(map(len, burst))  # so a prefill step of max(len) tokens takes one
    config = EngineConfig(
        prefill_chunk=max(map(len, burst)), max_decode_pause_s=max_decode_pause_s, fast_path=fast_path
    )
    engine = LLMEngine(loaded, config)
    steps: list[str] = []
    held, release = threading.Event(), threading.Event()
    prefill, decode = engine.runner.prefill, engine.runner.decode

    def recorded_prefill(plan):
        steps.append("prefill")
        return prefill(plan)

    def held_decode(request_ids, input_ids):
        if not held.is_set():  # the first decode waits until the burst is queued, so it lands all at once
            held.set()
            release.wait()
        steps.append("decode")
        return decode(request_ids, input_ids)

    try:
        await collect_ids(engine, burst[0])  # the runner has started (it may time steps of its own at its start)
        engine.runner.prefill, engine.runner.decode = recorded_prefill, held_decode
        running = asyncio.create_task(collect(engine, "go on", max_tokens=40))
        await eventually(held.is_set)
        arrivals = [asyncio.create_task(collect_ids(engine, ids)) for ids in burst]
        await eventually(lambda: engine.num_waiting == 3)
        steps.clear()
        release.set()
        await asyncio.gather(running, *arrivals)
        assert steps[1 : 1 + len(steps_after_the_burst)] == steps_after_the_burst  # steps[0]: the held decode
    finally:
        release.set()
        engine.close()


async def collect_ids(engine: LLMEngine, prompt_ids: list[int]) -> list:
    return [o async for o in engine.generate(prompt_ids, SamplingParams(max_tokens=4))]


async def test_a_consumer_whose_event_loop_closed_is_cancelled_and_the_engine_serves_on(tiny_engine):
    """A stream read from an event loop that then closes without closing the stream (a script's asyncio loop,
    a torn-down test): delivering its next token failed and killed the engine thread, and every later stream
    hung. Now the engine cancels that request and serves on."""

    def read_one_token_then_close_the_loop() -> None:
        loop = asyncio.new_event_loop()
        orphan = tiny_engine.generate(tiny_engine.processor.tokenize("go on"), SamplingParams(max_tokens=400))
        loop.run_until_complete(orphan.__anext__())
        loop.close()  # the stream is left open: its next outputs have no loop to go to

    await asyncio.to_thread(read_one_token_then_close_the_loop)
    await eventually(lambda: tiny_engine.num_running == 0)
    outputs = await asyncio.wait_for(collect(tiny_engine, "still serving", max_tokens=5), timeout=30)
    assert outputs[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


async def test_cancel_by_request_id_ends_a_stream_nobody_closes(tiny_engine):
    """The executor cancels by id when Jina's worker drops its generator without closing it (workarounds/)."""
    reported = []
    tiny_engine.on_finished = reported.append
    try:
        stream = tiny_engine.generate(
            tiny_engine.processor.tokenize("go on"), SamplingParams(max_tokens=4000), "left-open"
        )
        first = await anext(stream)
        tiny_engine.cancel("left-open")
        rest = [o async for o in stream]
        assert first.request_id == "left-open" and first.finish_reason is None
        assert rest[-1].finish_reason is FinishReason.CANCELLED and len(rest) < 100
        await eventually(lambda: any(o.request_id == "left-open" for o in reported))
        tiny_engine.cancel("left-open")  # finished: a no-op
    finally:
        tiny_engine.on_finished = None


async def test_a_request_id_already_in_flight_is_refused(tiny_engine):
    stream = tiny_engine.generate(tiny_engine.processor.tokenize("go on"), SamplingParams(max_tokens=4000), "twice")
    await anext(stream)
    try:
        duplicate = [o async for o in tiny_engine.generate([1, 2], SamplingParams(max_tokens=2), "twice")]
        assert [o.error_code for o in duplicate] == [ErrorCode.INVALID_REQUEST]
        assert "already in flight" in duplicate[0].error
    finally:
        await stream.aclose()


async def test_each_step_wakes_the_event_loop_once_for_all_of_its_streams(tiny_engine, monkeypatch):
    """Outputs of one step reach an event loop in one call_soon_threadsafe, not one per stream."""
    loop = asyncio.get_running_loop()
    calls = []
    original = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        calls.append(callback)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    steps = tiny_engine.steps
    streams = await asyncio.gather(*(collect(tiny_engine, p, max_tokens=16) for p in PROMPTS[:4]))
    outputs = sum(map(len, streams))
    assert outputs >= 4 * 8
    assert len(calls) <= tiny_engine.steps - steps + 1 < outputs / 2


async def test_every_finished_request_is_reported_once_with_its_reason(tiny_engine):
    """on_finished (the executor's metrics) hears of every request as it finishes, also of one whose consumer
    left, which then reads nothing more."""
    reported = []
    tiny_engine.on_finished = reported.append
    try:
        completed = await collect(tiny_engine, "count me", max_tokens=3)
        stream = tiny_engine.generate(tiny_engine.processor.tokenize("leave early"), SamplingParams(max_tokens=400))
        left = await anext(stream)
        await stream.aclose()
        ours = {completed[-1].request_id, left.request_id}  # streams of earlier tests may still be finishing
        await eventually(lambda: len([o for o in reported if o.request_id in ours]) == 2)
        assert [(o.request_id, o.finish_reason) for o in reported if o.request_id in ours] == [
            (completed[-1].request_id, FinishReason.LENGTH),
            (left.request_id, FinishReason.CANCELLED),
        ]
        assert [o.completion_tokens for o in reported if o.request_id == completed[-1].request_id] == [3]
    finally:
        tiny_engine.on_finished = None


@pytest.mark.parametrize(
    "prompt, stop, message",
    [
        ("x" * 70000, (), "the prompt is 70000 characters; the limit is 65536 characters"),
        ("hi", ("a",) * 17, "17 stop strings given; the limit is 16"),
        ("hi", ("a" * 257,), "a stop string is 257 characters; the limit is 256 characters"),
    ],
)
def test_prompts_and_stop_strings_beyond_the_limits_are_refused_before_tokenizing(tiny_engine, prompt, stop, message):
    with pytest.raises(InvalidRequest, match=message):
        tiny_engine.processor.prepare(prompt, SamplingParams(max_tokens=4, stop=stop))


def test_prepare_gives_the_prompt_ids_generate_takes(tiny_engine):
    params = SamplingParams(max_tokens=4, stop=("\n\n",))
    assert tiny_engine.processor.prepare("hello", params) == tiny_engine.processor.tokenize("hello")


async def test_logprobs_are_the_models_own_log_probabilities(embedded_engine):
    """Each output's logprob and top alternatives equal a plain forward's log_softmax at that position (fp32)."""
    prompt_ids = embedded_engine.processor.tokenize(PROMPTS[0])
    params = SamplingParams(max_tokens=6, top_logprobs=5)
    outputs = [o async for o in embedded_engine.generate(prompt_ids, params)]
    model = load_model("embedded", dtype="float32").model
    tokens = [o.token_id for o in outputs]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for step, output in enumerate(outputs):
        assert output.logprobs.logprob == pytest.approx(float(expected[step, output.token_id]), abs=1e-3)
        top = torch.topk(expected[step], 5)
        assert list(output.logprobs.top_ids) == top.indices.tolist()
        assert list(output.logprobs.top_logprobs) == pytest.approx(top.values.tolist(), abs=1e-3)
        assert output.logprobs.top_ids[0] == output.token_id  # greedy: the most likely token
    plain = await collect(embedded_engine, PROMPTS[0], max_tokens=2)
    assert all(o.logprobs is None for o in plain)  # nobody asked: nothing computed


async def test_logit_bias_and_penalties_change_what_is_chosen(embedded_engine):
    greedy = await collect(embedded_engine, PROMPTS[0], max_tokens=8)
    forced = greedy[0].token_id + 1
    biased = await collect(embedded_engine, PROMPTS[0], max_tokens=3, logit_bias=((forced, 100.0),))
    assert [o.token_id for o in biased] == [forced] * 3
    # A strong frequency penalty forbids repeating any generated token.
    penalized = await collect(
        embedded_engine, "Repeat after me: la la la la la la la la", max_tokens=16, frequency_penalty=2.0
    )
    ids = [o.token_id for o in penalized if o.token_id >= 0]
    repeated = await collect(embedded_engine, "Repeat after me: la la la la la la la la", max_tokens=16)
    assert len(set(ids)) > len({o.token_id for o in repeated})


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be between -2 and 2, got 2.5"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty must be between -2 and 2, got nan"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a number > 0, got 0.0"),
        ({"logit_bias": ((10**9, 1.0),)}, "logit_bias names token 1000000000; token ids go from 0 to"),
        ({"logit_bias": ((5, 101.0),)}, "logit_bias for token 5 must be between -100 and 100, got 101.0"),
        ({"top_logprobs": 21}, "top_logprobs must be between 0 and 20, got 21"),
    ],
)
def test_logits_processing_settings_out_of_range_are_refused(tiny_engine, sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        tiny_engine.processor.check([1, 2, 3], SamplingParams(max_tokens=4, **sampling))


def test_a_conversation_goes_through_the_chat_template_turn_by_turn(embedded_engine):
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "How are you?"},
    ]
    expected = embedded_engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert embedded_engine.processor.prepare(messages, SamplingParams(max_tokens=4)) == list(expected["input_ids"])
    # The model's default system turn is not added in front of the conversation's own.
    assert (
        embedded_engine.tokenizer.decode(embedded_engine.processor.tokenize(messages)).count("<|im_start|>system") == 1
    )


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages is empty"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\].role is 'tool'; this model takes system, user, assistant"),
        ([{"role": "user", "content": None}], r"messages\[0\].content must be a text"),
    ],
)
def test_a_conversation_the_model_cannot_take_is_refused(embedded_engine, messages, message):
    with pytest.raises(InvalidRequest, match=message):
        embedded_engine.processor.prepare(messages, SamplingParams(max_tokens=4))


def test_torch_work_before_serving_runs_on_threads_that_end(tiny_model_dir, monkeypatch):
    """Loading and building the runner leave no OpenMP team behind on the caller's thread (engine/openmp.py),
    and their failures still reach the caller."""
    import engine.engine as engine_module
    import engine.loading as loading_module

    seen: dict[str, threading.Thread] = {}

    def spy(name, real):
        def wrapped(*args, **kwargs):
            seen[name] = threading.current_thread()
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(loading_module, "_load", spy("load", loading_module._load))
    monkeypatch.setattr(engine_module, "make_runner", spy("runner", engine_module.make_runner))
    engine = LLMEngine(load_model(str(tiny_model_dir), dtype="float32"), EngineConfig(max_running=2))
    try:
        assert set(seen) == {"load", "runner"}
        for thread in seen.values():
            assert thread is not threading.current_thread() and thread is not engine._thread
            assert not thread.is_alive()
    finally:
        engine.close()
    with pytest.raises(ValueError, match="quantization='int8' needs the fast path"):
        LLMEngine(load_model(str(tiny_model_dir), dtype="float32"), EngineConfig(fast_path=False, quantization="int8"))
