"""The two in-process systems, no Jina: streams with the same shape as the service's, for bench.load to time.

* `kv_cache_process`: the single-stream ceiling, the simplest fast loop there is: prefill the prompt, then
  model(input_ids=last, past_key_values=cache, use_cache=True) once per token, greedy, EOS ignored so it always
  runs max_tokens, in a process of its own, one stream at a time.
* `engine_stream`: LLMEngine alone (its batching decode loop and detokenizer), so the difference to the flow is
  what Jina (gateway, gRPC, per-document serialization) costs.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
from transformers import DynamicCache

from engine import EngineConfig, LLMEngine, LoadedModel, SamplingParams, load_model


@dataclass
class Token:
    token_id: int


def prompt_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    """The chat template, exactly as the engine applies it."""
    encoded = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _decode_forever(model_name: str, device: str, dtype: str, requests: Connection, tokens: Connection) -> None:
    """The ceiling process: per request (prompt, max_tokens), prefill then one forward per token, each token
    sent as soon as it is known, then None."""
    loaded = load_model(model_name, device=device, dtype=dtype)
    model = loaded.model
    # Logits of the last position only (as the engine asks): the prefill skips a [prompt, vocab] matmul.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        while (request := requests.recv()) is not None:
            prompt, max_tokens = request
            input_ids = torch.tensor([prompt_ids(loaded, prompt)], device=loaded.device)
            cache = DynamicCache(config=model.config)
            for _ in range(max_tokens):
                logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra).logits
                token = logits[0, -1].argmax()
                tokens.send(int(token))  # int() waits for the device: the token is really there
                input_ids = token.view(1, 1)
            tokens.send(None)


@contextmanager
def kv_cache_process(model_name: str, device: str, dtype: str) -> Iterator[Callable[[str, int], AsyncIterator[Token]]]:
    """The ceiling runs in a process of its own, so that its torch work has the process to itself: a second
    thread doing torch work beside the engine's in one process (a second OpenMP team on 2 cores) measured 57 ->
    70 ms per token for both of them. Tokens come back over a pipe, read off the event loop."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state inherited
    requests, requests_end = context.Pipe()
    tokens_end, tokens = context.Pipe()
    process = context.Process(
        target=_decode_forever, args=(model_name, device, dtype, requests_end, tokens), daemon=True
    )
    process.start()
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-cache-reader")

    async def open_stream(prompt: str, max_tokens: int) -> AsyncIterator[Token]:
        loop = asyncio.get_running_loop()
        requests.send((prompt, max_tokens))
        while (token_id := await loop.run_in_executor(reader, tokens_end.recv)) is not None:
            yield Token(token_id)

    try:
        yield open_stream
    finally:
        requests.send(None)
        process.join(timeout=30)
        reader.shutdown()


def start_engine(loaded: LoadedModel, max_running: int = 32, max_waiting: int = 256, **settings) -> LLMEngine:
    """The engine as the executor configures it (flow.yml's limits; other EngineConfig `settings`), warmed up the
    same way."""
    engine = LLMEngine(loaded, EngineConfig(max_running=max_running, max_waiting=max_waiting, **settings))
    engine.run_to_completion(engine.processor.tokenize("Hello", True), SamplingParams(max_tokens=8))
    return engine


def engine_stream(engine: LLMEngine):
    def open_stream(prompt: str, max_tokens: int) -> AsyncIterator:
        return engine.generate(engine.processor.tokenize(prompt, True), SamplingParams(max_tokens=max_tokens))

    return open_stream
