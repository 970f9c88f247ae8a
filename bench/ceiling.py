"""The two in-process systems, no Jina: streams with the same shape as the service's, for bench.load to time.

* `kv_cache_stream`: the single-stream ceiling, the simplest fast loop there is: prefill the prompt, then
  model(input_ids=last, past_key_values=cache, use_cache=True) once per token, greedy, EOS ignored so it always
  runs max_tokens, on a thread of its own (like the engine's loop), one stream at a time.
* `engine_stream`: LLMEngine alone (its batching decode loop and detokenizer), so the difference to the flow is
  what Jina (gateway, gRPC, per-document serialization) costs.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from transformers import DynamicCache

from engine import EngineConfig, LLMEngine, LoadedModel, SamplingParams


@dataclass
class Token:
    token_id: int


def prompt_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    """The chat template, exactly as the engine applies it."""
    encoded = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def kv_cache_stream(loaded: LoadedModel):
    model = loaded.model
    # Logits of the last position only (as the engine asks): the prefill skips a [prompt, vocab] matmul.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def decode(prompt: str, max_tokens: int, deliver) -> None:
        with torch.inference_mode():
            input_ids = torch.tensor([prompt_ids(loaded, prompt)], device=loaded.device)
            cache = DynamicCache(config=model.config)
            for _ in range(max_tokens):
                logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra).logits
                token = logits[0, -1].argmax()
                deliver(Token(int(token)))  # int() waits for the device: the token is really there
                input_ids = token.view(1, 1)
        deliver(None)

    async def open_stream(prompt: str, max_tokens: int) -> AsyncIterator[Token]:
        # The loop runs on its own thread and hands tokens to the event loop, as the engine's loop thread does:
        # same threading, same delivery path (on a loaded CPU, torch on the main thread measured slower).
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        deliver = lambda item: loop.call_soon_threadsafe(tokens.put_nowait, item)  # noqa: E731
        worker = threading.Thread(target=decode, args=(prompt, max_tokens, deliver), name="kv-cache-loop")
        worker.start()
        try:
            while (item := await tokens.get()) is not None:
                yield item
        finally:
            await asyncio.to_thread(worker.join)

    return open_stream


def start_engine(loaded: LoadedModel, max_running: int = 32, max_waiting: int = 256) -> LLMEngine:
    """The engine as the executor configures it (flow.yml's limits), warmed up the same way."""
    engine = LLMEngine(loaded, EngineConfig(max_running=max_running, max_waiting=max_waiting))
    engine.run_to_completion(engine.tokenize("Hello", True), SamplingParams(max_tokens=8))
    return engine


def engine_stream(engine: LLMEngine):
    def open_stream(prompt: str, max_tokens: int) -> AsyncIterator:
        return engine.generate(engine.tokenize(prompt, True), SamplingParams(max_tokens=max_tokens))

    return open_stream
