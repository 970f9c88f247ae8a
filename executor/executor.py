"""TokenStreamingExecutor: the thin Jina skin over the engine.

It validates a PromptDocument, submits it to the engine, and relays each StepOutput as a ModelOutputDocument.
It never raises out of a streaming generator (Jina's gateway would replay the stream): every failure becomes
a last document with finish_reason='error', an `error` in words and an `error_code` (schemas.ErrorCode).

The engine's settings and their defaults are EngineConfig's (engine/config.py): the signature below takes them
from there, so config.yml and the flows name a setting only to change it.
"""

# No `from __future__ import annotations` here: Jina reads the endpoint's document types from real annotations.
import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from docarray import DocList
from jina import Executor, requests
from prometheus_client import CollectorRegistry

from engine import (
    EMBEDDED,
    EngineConfig,
    FinishReason,
    InvalidRequest,
    LLMEngine,
    LoadedModel,
    SamplingParams,
    StepOutput,
    load_model,
)
from executor.metrics import StreamMetrics
from lifecycle import OpenStreams, drain_on_sigterm
from schemas import ErrorCode, ModelOutputDocument, PromptDocument, error_document
from workarounds import jina_worker

WARMUP_PROMPT = "Hello"


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
        warmup_tokens: int = 8,
        shutdown_grace_s: float = 10.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        jina_worker.install()  # before the model loads: an unverified jina fails the start at once
        loaded = load_model(model, device=device, dtype=dtype)
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

    def build_engine(self, loaded: LoadedModel, config: EngineConfig) -> LLMEngine:
        """The seam where a subclass builds its engine otherwise (tests/faulty_executor.py injects a fault)."""
        return LLMEngine(loaded, config)

    def _warm_up(self, tokens: int) -> None:
        prompt_ids = self.engine.tokenize(WARMUP_PROMPT, self.chat_template)
        self.engine.run_to_completion(prompt_ids, SamplingParams(max_tokens=tokens))

    @requests(on="/stream")
    # Jina reads the streamed document type from the return annotation: the one thing an async generator's
    # annotation cannot say for mypy.
    async def stream(self, doc: PromptDocument, **kwargs) -> ModelOutputDocument:  # type: ignore[misc]
        """One ModelOutputDocument per decode step; the last one carries finish_reason, usage and timings."""
        async for output in self._generate(doc):
            yield output

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
            self.metrics.requests.labels(FinishReason.ERROR.value).inc()
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
                yield to_document(output)
        except Exception as error:  # a bug of ours while relaying
            self.logger.error(f"relaying {request_id} failed: {error!r}")
            if not finished:
                yield error_document(f"internal error while relaying the stream: {error!r}", ErrorCode.INTERNAL)
        finally:
            stop_watching()

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
        prompt_ids = await asyncio.to_thread(self.engine.prepare, doc.prompt, params, template)
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
        # The engine's codes are the contract's (tests/test_error_codes.py): a value the contract lacks fails loudly.
        error_code=None if output.error_code is None else ErrorCode(output.error_code.value).value,
        prompt_tokens=output.prompt_tokens if output.finished else None,
        completion_tokens=output.completion_tokens if output.finished else None,
        queue_time_s=output.queue_time_s,
        time_to_first_token_s=output.time_to_first_token_s,
        total_time_s=output.total_time_s,
    )
