"""TokenStreamingExecutor: the thin Jina skin over the engine.

It validates a PromptDocument, submits it to the engine, and relays each StepOutput as a ModelOutputDocument.
It never raises out of a streaming generator (Jina's gateway would replay the stream): every failure becomes
a last document with finish_reason='error', an `error` in words and an `error_code` (schemas.ErrorCode).

The engine's settings and their defaults are EngineConfig's (engine/config.py): the signature below takes them
from there, so config.yml and the flows name a setting only to change it.
"""

# No `from __future__ import annotations` here: Jina reads the endpoint's document types from real annotations.
import asyncio
import functools
import hashlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from docarray import DocList
from docarray.typing import NdArray
from jina import Executor, requests
from prometheus_client import CollectorRegistry
from pydantic import parse_obj_as

from engine import (
    EMBEDDED,
    Constraint,
    ConstraintKind,
    EngineConfig,
    FinishReason,
    InvalidRequest,
    LLMEngine,
    LoadedModel,
    Prompt,
    SamplingParams,
    StepOutput,
    Tools,
    load_model,
)
from engine.loading import ModelNotFound
from engine.prompts import PromptEncoder
from executor.metrics import StreamMetrics
from lifecycle import OpenStreams, die_with_parent, drain_on_sigterm
from schemas import (
    ChatMessage,
    ErrorCode,
    ModelInfoDocument,
    ModelOutputDocument,
    PromptDocument,
    ToolSyntax,
    error_document,
    json_or_text,
)
from workarounds import jina_worker

WARMUP_PROMPT = "Hello"
EMBEDDED_ID = "SmolLM2-135M-Instruct"  # the embedded GGUF's model


class TokenStreamingExecutor(Executor):
    def __init__(
        self,
        model: str = EMBEDDED,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: bool = True,
        max_running: int = EngineConfig.max_running,
        max_waiting: int = EngineConfig.max_waiting,
        prefill_chunk: int = EngineConfig.prefill_chunk,
        max_decode_pause_s: float = EngineConfig.max_decode_pause_s,
        max_model_len: int | None = EngineConfig.max_model_len,
        max_prompt_chars: int | None = EngineConfig.max_prompt_chars,
        max_stop_strings: int = EngineConfig.max_stop_strings,
        max_stop_length: int = EngineConfig.max_stop_length,
        fast_path: bool = EngineConfig.fast_path,
        quantization: str = EngineConfig.quantization,
        prefix_cache_mib: int = EngineConfig.prefix_cache_mib,
        prefix_block_size: int = EngineConfig.prefix_block_size,
        max_constraint_chars: int = EngineConfig.max_constraint_chars,
        max_schema_depth: int = EngineConfig.max_schema_depth,
        grammar_cache_size: int = EngineConfig.grammar_cache_size,
        warmup_tokens: int = 8,
        shutdown_grace_s: float = 10.0,
        **kwargs,
    ) -> None:
        die_with_parent()  # until drain_on_sigterm below: a `jina flow` stopped while the model loads takes it along
        super().__init__(**kwargs)
        jina_worker.install()  # before the model loads: an unverified jina fails the start at once
        try:
            loaded = load_model(model, device=device, dtype=dtype)
        except ModelNotFound as error:
            # Jina logs the exception in the columns of an 80-character console, which cut a word longer than a
            # column (a path, where the model was looked for) with an ellipsis: the message also goes out whole.
            print(f"ERROR {error}", file=sys.stderr, flush=True)
            raise
        self.engine = self.build_engine(loaded, EngineConfig(
            max_running=max_running,
            max_waiting=max_waiting,
            prefill_chunk=prefill_chunk,
            max_decode_pause_s=max_decode_pause_s,
            max_model_len=max_model_len,
            max_prompt_chars=max_prompt_chars,
            max_stop_strings=max_stop_strings,
            max_stop_length=max_stop_length,
            fast_path=fast_path,
            quantization=quantization,
            prefix_cache_mib=prefix_cache_mib,
            prefix_block_size=prefix_block_size,
            max_constraint_chars=max_constraint_chars,
            max_schema_depth=max_schema_depth,
            grammar_cache_size=grammar_cache_size,
        ))
        self.chat_template = chat_template
        # Logprobs name up to 21 tokens a step: each token's text is decoded once. A byte-level token that holds
        # part of a character decodes to U+FFFD, as in vLLM's and OpenAI's answers.
        tokenizer = self.engine.tokenizer
        self.token_text = functools.lru_cache(maxsize=65536)(lambda token_id: str(tokenizer.decode([token_id])))
        self.shutdown_grace_s = shutdown_grace_s
        self._open_streams = OpenStreams()  # generators that have not handed their last document to Jina yet
        self.model_info = model_info(loaded, self.engine.max_model_len, self.engine.processor.prompts)
        registry = getattr(self.runtime_args, "metrics_registry", None) or CollectorRegistry()
        self.metrics = StreamMetrics(registry, self.model_info.model, self.engine)
        if warmup_tokens > 0:
            # In __init__, so before Jina starts the server and its health check reports SERVING: the first real
            # request then runs as fast as the later ones.
            self._warm_up(warmup_tokens)
        self.engine.on_finished = self.metrics.observe_finished  # after the warm-up, which no client asked for
        drain_on_sigterm(self._drain)
        self.logger.info(f"serving {loaded.name} on {loaded.device}: {self.engine.runner.describe()}")

    def build_engine(self, loaded: LoadedModel, config: EngineConfig) -> LLMEngine:
        """The seam where a subclass builds its engine otherwise (tests/faulty_executor.py injects a fault)."""
        return LLMEngine(loaded, config)

    def _warm_up(self, tokens: int) -> None:
        prompt_ids = self.engine.processor.tokenize(WARMUP_PROMPT, self.chat_template)
        self.engine.run_to_completion(prompt_ids, SamplingParams(max_tokens=tokens))

    @requests(on="/stream")
    # Jina reads the streamed document type from the return annotation: the one thing an async generator's
    # annotation cannot say for mypy.
    async def stream(self, doc: PromptDocument, **kwargs) -> ModelOutputDocument:  # type: ignore[misc]
        """One ModelOutputDocument per decode step; the last one carries finish_reason, usage and timings."""
        async for output in self._generate(doc):
            yield output

    @requests(on="/info")
    async def info(self, docs: DocList[ModelInfoDocument], **kwargs) -> DocList[ModelInfoDocument]:
        """What this replica serves: the gateway's OpenAI API names the model by it (gateway/model_info.py)."""
        return DocList[ModelInfoDocument]([self.model_info for _ in docs])

    @requests(on="/generate")
    async def generate(self, docs: DocList[PromptDocument], **kwargs) -> DocList[ModelOutputDocument]:
        """Unary: the last document of each prompt's stream (its generated_text is the whole answer)."""

        async def last_document(doc: PromptDocument) -> ModelOutputDocument:
            async for last in self._generate(doc):  # noqa: B007 (the loop keeps the last document)
                pass
            return last  # _relay always yields a last document

        return DocList[ModelOutputDocument](await asyncio.gather(*(last_document(doc) for doc in docs)))

    def _generate(self, doc: PromptDocument) -> AsyncIterator[ModelOutputDocument]:
        return self._open_streams.track(self._relay(doc))

    async def _relay(self, doc: PromptDocument) -> AsyncIterator[ModelOutputDocument]:
        # Never raises out of a streaming endpoint (Jina's gateway would replay it): a failure is a last document.
        try:
            prompt_ids, params = await self._prepare(doc)
        except Exception as error:
            # Refused before the engine took it (the engine's on_finished counts the requests it took).
            self.metrics.count_request(FinishReason.ERROR.value)
            if isinstance(error, InvalidRequest):
                yield error_document(str(error), ErrorCode.INVALID_REQUEST)
            else:
                yield error_document(f"internal error while preparing the request: {error!r}", ErrorCode.INTERNAL)
            return
        request_id = f"exec-{uuid.uuid4().hex}"
        # Jina's worker may drop this generator at its `yield` when the call is cancelled, without closing it: the
        # end of its task must cancel the request (workarounds/jina_worker.py). A no-op once the request finished.
        worker_task = asyncio.current_task()
        assert worker_task is not None  # a generator being iterated runs in a task
        stop_watching = jina_worker.cancel_when_task_ends(worker_task, lambda: self.engine.cancel(request_id))
        finished = False
        try:
            last_output_at = None
            async for output in self.engine.generate(prompt_ids, params, request_id):
                now = time.perf_counter()
                self.metrics.observe_token(output, None if last_output_at is None else now - last_output_at)
                last_output_at = now
                finished = output.finished
                yield to_document(output, self.token_text)
        except Exception as error:  # a bug of ours while relaying
            self.logger.error(f"relaying {request_id} failed: {error!r}")
            if not finished:
                yield error_document(f"internal error while relaying the stream: {error!r}", ErrorCode.INTERNAL)
        finally:
            stop_watching()

    async def _prepare(self, doc: PromptDocument) -> tuple[list[int], SamplingParams]:
        params = sampling_params(doc)
        template = self.chat_template if doc.chat_template is None else doc.chat_template
        # Off the event loop: a 100k-character prompt takes a while to tokenize.
        prompt_ids = await asyncio.to_thread(
            self.engine.processor.prepare, prompt_of(doc), params, template, tools_of(doc)
        )
        return prompt_ids, params

    async def _drain(self) -> None:
        """On SIGTERM, before Jina stops the server: refuse new streams, give running ones `shutdown_grace_s` to
        finish, end the rest with finish_reason=shutdown, and wait until every stream has handed its last
        document to Jina, so that no client is cut off without one."""
        self.logger.warning(f"SIGTERM: draining {self.engine.num_running + self.engine.num_waiting} streams")
        await asyncio.to_thread(self.engine.shutdown, self.shutdown_grace_s)
        await self._open_streams.wait_closed(timeout_s=5)

    def close(self) -> None:
        self.engine.close()
        super().close()


def model_info(loaded: LoadedModel, max_model_len: int, prompts: PromptEncoder) -> ModelInfoDocument:
    if loaded.name == EMBEDDED:
        model = EMBEDDED_ID
    else:  # a hub id as it is; a local directory by its last part (the full path is a detail of this host)
        model = Path(loaded.name).name if Path(loaded.name).is_dir() else loaded.name
    served = f"{model}|{loaded.dtype}|{loaded.device.type}|{max_model_len}"
    fingerprint = "fp_" + hashlib.sha256(served.encode()).hexdigest()[:10]
    # The engine's syntax names are the contract's: one the contract lacks fails the start loudly.
    syntax = None if prompts.tool_syntax is None else ToolSyntax(prompts.tool_syntax).value
    return ModelInfoDocument(model=model, max_model_len=max_model_len, fingerprint=fingerprint, tool_format=syntax,
                             tool_tokens=list(prompts.tool_tokens) if syntax else None)


def prompt_of(doc: PromptDocument) -> Prompt:
    """The document's text or conversation, as the engine takes it; InvalidRequest unless exactly one is sent."""
    if doc.messages is not None:
        if doc.prompt is not None:
            raise InvalidRequest("send either `prompt` or `messages`, not both")
        if doc.messages and not any(message.content.strip() for message in doc.messages):
            raise InvalidRequest("the messages hold no text: send some in `content`")
        return [conversation_message(message) for message in doc.messages]
    if not isinstance(doc.prompt, str) or not doc.prompt.strip():
        raise InvalidRequest("the prompt is empty: send some text in `prompt`, or a conversation in `messages`")
    return str(doc.prompt)


def conversation_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: calls as transformers' templates read them, their arguments a JSON
    value (a template writes them with `tojson`) rather than its text."""
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        entry["tool_calls"] = [{"id": call.call_id, "type": "function", "function": {
            "name": call.name, "arguments": json_or_text(call.arguments)}} for call in message.tool_calls]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def tools_of(doc: PromptDocument) -> Tools | None:
    """The document's tools, a JSON array of objects; InvalidRequest naming the field otherwise."""
    if doc.tools is None:
        return None
    try:
        tools = json.loads(doc.tools)
    except ValueError as error:
        raise InvalidRequest(f"tools is not JSON: {error}") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise InvalidRequest("tools must be a JSON array of tools: [{\"type\": \"function\", \"function\": {...}}]")
    return tools


def sampling_params(doc: PromptDocument) -> SamplingParams:
    """The document's settings as the engine takes them; the engine checks the ranges (prepare)."""
    return SamplingParams(
        max_tokens=doc.max_tokens,
        temperature=doc.temperature or 0.0,
        top_p=1.0 if doc.top_p is None else doc.top_p,
        seed=doc.seed,
        stop=tuple(doc.stop or ()),
        presence_penalty=doc.presence_penalty or 0.0,
        frequency_penalty=doc.frequency_penalty or 0.0,
        repetition_penalty=1.0 if doc.repetition_penalty is None else doc.repetition_penalty,
        logit_bias=logit_bias(doc.logit_bias or {}),
        logprobs=bool(doc.logprobs),
        top_logprobs=doc.top_logprobs or 0,
        constraint=constraint(doc),
    )


def constraint(doc: PromptDocument) -> Constraint | None:
    """The document's structured-output field, at most one of them."""
    given = [kind for kind in ConstraintKind if getattr(doc, kind.value) is not None]
    if len(given) > 1:
        names = " and ".join(kind.value for kind in given)
        raise InvalidRequest(f"send at most one of json_schema, regex and grammar; got {names}")
    return Constraint(given[0], getattr(doc, given[0].value)) if given else None


def logit_bias(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids, written as text (JSON keys), to biases."""
    pairs = []
    for key, value in bias.items():
        try:
            pairs.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequest(f"logit_bias keys are token ids, got {key!r}") from None
    return tuple(pairs)


def to_document(output: StepOutput, token_text: Callable[[int], str]) -> ModelOutputDocument:
    """`token_text` names tokens (the executor's tokenizer) when the request asked for logprobs."""
    doc = ModelOutputDocument(
        token_id=output.token_id,
        generated_text=output.generated_text,
        text=output.text,
        index=output.index,
        finish_reason=None if output.finish_reason is None else output.finish_reason.value,
        error=output.error,
        # The engine's codes are the contract's (tests/test_error_codes.py): a value the contract lacks fails loudly.
        error_code=None if output.error_code is None else ErrorCode(output.error_code.value).value,
        prompt_tokens=output.prompt_tokens if output.finished else None,
        completion_tokens=output.completion_tokens if output.finished else None,
        cached_tokens=output.cached_tokens if output.finished else None,
        queue_time_s=output.queue_time_s,
        time_to_first_token_s=output.time_to_first_token_s,
        total_time_s=output.total_time_s,
    )
    if (logprobs := output.logprobs) is not None:
        doc.token = token_text(output.token_id)
        doc.logprob = logprobs.logprob
        doc.top_token_ids = parse_obj_as(NdArray, np.asarray(logprobs.top_ids, dtype=np.int64))
        doc.top_logprobs = parse_obj_as(NdArray, np.asarray(logprobs.top_logprobs, dtype=np.float32))
        doc.top_tokens = [token_text(token_id) for token_id in logprobs.top_ids]
    return doc
