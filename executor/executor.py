"""TokenStreamingExecutor: the thin Jina skin over the engine.

It validates a PromptDocument, submits it to the engine, and relays each StepOutput as a ModelOutputDocument.
It never raises out of a streaming generator (Jina's gateway would replay the stream): every failure becomes
a last document with finish_reason='error' and an `error` in words.
"""

# No `from __future__ import annotations` here: Jina reads the endpoint's document types from real annotations.
import asyncio
import time
from typing import AsyncIterator

from docarray import DocList
from jina import Executor, requests
from prometheus_client import CollectorRegistry

from engine import EMBEDDED, EngineConfig, FinishReason, InvalidRequest, LLMEngine, SamplingParams, StepOutput, load_model
from executor.metrics import StreamMetrics
from lifecycle import OpenStreams, drain_on_sigterm
from schemas import ModelOutputDocument, PromptDocument, error_document

WARMUP_PROMPT = "Hello"


class TokenStreamingExecutor(Executor):
    def __init__(
        self,
        model: str = EMBEDDED,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: bool = True,
        max_running: int = 32,
        max_waiting: int = 256,
        prefill_chunk: int = 192,
        max_decode_pause_s: float = 0.4,
        max_model_len: int | None = None,
        warmup_tokens: int = 8,
        shutdown_grace_s: float = 10.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        loaded = load_model(model, device=device, dtype=dtype)
        self.engine = LLMEngine(loaded, EngineConfig(
            max_running=max_running,
            max_waiting=max_waiting,
            prefill_chunk=prefill_chunk,
            max_decode_pause_s=max_decode_pause_s,
            max_model_len=max_model_len,
        ))
        self.chat_template = chat_template
        self.shutdown_grace_s = shutdown_grace_s
        self._open_streams = OpenStreams()  # generators that have not handed their last document to Jina yet
        registry = getattr(self.runtime_args, "metrics_registry", None) or CollectorRegistry()
        self.metrics = StreamMetrics(registry, lambda: self.engine.num_running, lambda: self.engine.num_waiting)
        if warmup_tokens > 0:
            # In __init__, so before Jina starts the server and its health check reports SERVING: the first real
            # request then runs as fast as the later ones.
            self._warm_up(warmup_tokens)
        self.engine.on_finished = self.metrics.observe_finished  # after the warm-up, which no client asked for
        drain_on_sigterm(self._drain)
        self.logger.info(f"serving {loaded.name} on {loaded.device} ({loaded.dtype})")

    def _warm_up(self, tokens: int) -> None:
        prompt_ids = self.engine.tokenize(WARMUP_PROMPT, self.chat_template)
        self.engine.run_to_completion(prompt_ids, SamplingParams(max_tokens=tokens))

    @requests(on="/stream")
    async def stream(self, doc: PromptDocument, **kwargs) -> ModelOutputDocument:
        """One ModelOutputDocument per decode step; the last one carries finish_reason, usage and timings."""
        async for output in self._generate(doc):
            yield output

    @requests(on="/generate")
    async def generate(self, docs: DocList[PromptDocument], **kwargs) -> DocList[ModelOutputDocument]:
        """Unary: the last document of each prompt's stream (its generated_text is the whole answer)."""

        async def last_document(doc: PromptDocument) -> ModelOutputDocument:
            last = None
            async for last in self._generate(doc):
                pass
            return last

        return DocList[ModelOutputDocument](await asyncio.gather(*(last_document(doc) for doc in docs)))

    def _generate(self, doc: PromptDocument) -> AsyncIterator[ModelOutputDocument]:
        return self._open_streams.track(self._relay(doc))

    async def _relay(self, doc: PromptDocument) -> AsyncIterator[ModelOutputDocument]:
        try:
            prompt_ids, params = await self._prepare(doc)
        except Exception as error:  # never raise out of a streaming endpoint
            message = str(error) if isinstance(error, InvalidRequest) else f"internal error while preparing the request: {error!r}"
            self.metrics.requests.labels(FinishReason.ERROR.value).inc()  # a refusal is a request too
            yield error_document(message)
            return
        last_output_at = None
        # Owner: the task reading this generator, Jina worker's task of the gRPC call, which ends when the call
        # ends. A call cancelled while the worker sends a document drops this generator at its `yield` without
        # closing it (until a later garbage collection): the request must not run on to max_tokens meanwhile.
        async for output in self.engine.generate(prompt_ids, params, owner=asyncio.current_task()):
            now = time.perf_counter()
            self.metrics.observe_token(output, None if last_output_at is None else now - last_output_at)
            last_output_at = now
            yield to_document(output)

    async def _prepare(self, doc: PromptDocument) -> tuple[list[int], SamplingParams]:
        if not isinstance(doc.prompt, str) or not doc.prompt.strip():
            raise InvalidRequest("the prompt is empty: send some text in `prompt`")
        params = SamplingParams(
            max_tokens=doc.max_tokens,
            temperature=doc.temperature or 0.0,
            top_p=1.0 if doc.top_p is None else doc.top_p,
            seed=doc.seed,
            stop=tuple(doc.stop or ()),
        )
        template = self.chat_template if doc.chat_template is None else doc.chat_template
        # Off the event loop: a 100k-character prompt takes a while to tokenize.
        prompt_ids = await asyncio.to_thread(self.engine.tokenize, doc.prompt, template)
        self.engine.check(prompt_ids, params)
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


def to_document(output: StepOutput) -> ModelOutputDocument:
    return ModelOutputDocument(
        token_id=output.token_id,
        generated_text=output.generated_text,
        text=output.text,
        index=output.index,
        finish_reason=None if output.finish_reason is None else output.finish_reason.value,
        error=output.error,
        prompt_tokens=output.prompt_tokens if output.finished else None,
        completion_tokens=output.completion_tokens if output.finished else None,
        queue_time_s=output.queue_time_s,
        time_to_first_token_s=output.time_to_first_token_s,
        total_time_s=output.total_time_s,
    )
