"""LLMEngine: one thread owns the model and runs the decode loop for every stream of the replica.

Callers on an event loop submit requests with `generate` and read StepOutputs from an asyncio queue; blocking
callers use `run_to_completion`. The loop thread never waits on an event loop, and an event loop never waits on
the model. Each step of `_loop` is:

    plan    = scheduler.schedule()       which rows to free, prefill or decode (engine/scheduler.py: no torch)
    logits  = runner.prefill/decode()    one forward (engine/runner.py, engine/fast/): the runner owns the tensors
    outputs = sample, detokenize, stop   per request (engine/sampling.py, engine/output.py), among the tokens a
                                         constrained request's grammar allows (engine/structured.py)
    scheduler.update(), runner.free()    finished rows leave the batch
    dispatch                             one hand-off per event loop per step, with all of its outputs
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import torch

from engine.config import EngineConfig
from engine.loading import LoadedModel, resolve_dtype
from engine.openmp import on_passing_thread
from engine.output import RequestOutputProcessor, final_output
from engine.plan import PrefillPlan, Runner
from engine.prefix_cache import PrefixCacheStats
from engine.processor import InputProcessor
from engine.prompts import InvalidRequest
from engine.request import Consumer, ErrorCode, FinishReason, Request, SamplingParams, StepOutput, TokenLogprobs
from engine.runner import CacheRunner
from engine.sampling import sample_next_tokens
from engine.scheduler import Scheduler
from engine.structured import GrammarLimits, Grammars, MaskFiller

log = logging.getLogger(__name__)

OutputProcessorFactory = Callable[[Request, "LLMEngine"], RequestOutputProcessor]


def default_output_processor(request: Request, engine: LLMEngine) -> RequestOutputProcessor:
    return RequestOutputProcessor(request, engine.tokenizer, engine.eos_token_ids)


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        *,
        runner: Runner | None = None,
        output_processor: OutputProcessorFactory = default_output_processor,
    ) -> None:
        """`runner` and `output_processor` are seams: another runner, or an output processor that injects a fault
        (tests/faulty_executor.py)."""
        self.config = config or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.eos_token_ids = _eos_token_ids(loaded)
        vocab_size = loaded.model.config.vocab_size  # the width of the logits, which the masks cover
        limits = GrammarLimits.of(self.config)
        self.grammars = Grammars(loaded.tokenizer, vocab_size, self.eos_token_ids, limits)
        self._masks = MaskFiller(vocab_size)
        self.processor = InputProcessor(loaded, self.config, self.grammars)  # prompts to checked ids, off this thread
        self.max_model_len = self.processor.max_model_len
        # On a thread that ends (engine/openmp.py): the runner's weights are fused and converted by torch kernels.
        self.runner = runner or on_passing_thread(lambda: make_runner(loaded, self.config, self.max_model_len))
        self.scheduler = Scheduler(self.config, self.runner.prefix_cache)  # owned by the loop thread
        self._output_processor = output_processor
        self._processors: dict[str, RequestOutputProcessor] = {}  # running requests' (loop thread)
        self._outbox: list[tuple[Request, StepOutput]] = []  # this step's outputs, dispatched at its end
        self._released: list[str] = []  # this step's finished requests, no longer in flight once it is published
        self.steps = 0  # forwards run (loop thread)
        self._last_decode_rows = 0  # rows of the last decode step (loop thread)
        # Called on the loop thread with the last output of every request, refusals included, also when nobody
        # reads the stream any more: where finished requests are counted (the executor's metrics).
        self.on_finished: Callable[[StepOutput], None] | None = None

        # Shared between the callers' threads and the loop thread, under the lock.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)  # notified when the last request in flight finishes
        self._inbox: list[Request] = []  # submitted, not yet handed to the scheduler
        self._cancels: set[str] = set()  # asked for, not yet handed to the scheduler
        self._in_flight: set[str] = set()  # submitted and not finished: what admission control counts
        self._running_rows = 0  # the scheduler's running + prefilling rows, published after each step
        self._decode_rows = 0  # rows of the last decode step, 0 once none runs, published after each step
        self._kv_cache_tokens = 0  # positions the batch's rows hold in the KV cache, published after each step
        self._prefix_cache_stats = PrefixCacheStats()  # published after each step
        self._accepting = True
        self._stopping = False
        self._unavailable: str | None = None  # why the engine cannot serve at all (its start failed)
        self._ids = itertools.count()

        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- the callers' side (any thread, an event loop) ----

    @property
    def num_running(self) -> int:
        with self._lock:
            return self._running_rows

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._in_flight) - self._running_rows

    @property
    def decode_batch_size(self) -> int:
        with self._lock:
            return self._decode_rows

    @property
    def kv_cache_tokens(self) -> int:
        with self._lock:
            return self._kv_cache_tokens

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The prefix cache's counts (all 0 without one)."""
        with self._lock:
            return self._prefix_cache_stats

    @property
    def prefix_cache_block_bytes(self) -> int:
        """Bytes one of the prefix cache's blocks holds (0 without one)."""
        return self.runner.prefix_block_bytes

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one request. Leaving the iteration early (a break, a cancelled task, aclose())
        cancels the request in the engine, as does `cancel(request_id)`. Never raises for the request's own
        failures: the last output says what happened. `request_id` must be unique among requests in flight."""
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        consumer = Consumer(outputs.put_nowait, asyncio.get_running_loop())
        request = Request(request_id or self.new_request_id(), prompt_ids, params, consumer)
        refusal = self._submit(request)
        if refusal is not None:
            yield refusal
            return
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.cancel(request.request_id)

    def run_to_completion(self, prompt_ids: list[int], params: SamplingParams) -> list[StepOutput]:
        """Blocking generation for callers without an event loop (warm-up, scripts)."""
        outputs: list[StepOutput] = []
        done = threading.Event()

        def put(output: StepOutput) -> None:
            outputs.append(output)
            if output.finished:
                done.set()

        refusal = self._submit(Request(self.new_request_id(), prompt_ids, params, Consumer(put)))
        if refusal is not None:
            return [refusal]
        done.wait()
        return outputs

    def cancel(self, request_id: str) -> None:
        """End the request at the next step with finish_reason=cancelled; a no-op once it has finished."""
        with self._lock:
            if request_id in self._in_flight:
                self._cancels.add(request_id)
                self._work.notify()

    def shutdown(self, grace_s: float) -> None:
        """Refuse new requests at once, give the ones in flight up to `grace_s` seconds to finish, then end the
        rest with finish_reason=shutdown and stop. Blocks: call it off the event loop."""
        with self._lock:
            self._accepting = False
            self._idle.wait_for(lambda: not self._in_flight, timeout=grace_s)
        self.close()

    def close(self) -> None:
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._work.notify()
        self._thread.join(timeout=30)

    def _submit(self, request: Request) -> StepOutput | None:
        """Queue the request; or return its refusal, its only output."""
        refusal = self._with_matcher(request) or self._admit(request)
        if refusal is not None:
            self._report_finished(refusal)
        return refusal

    def _with_matcher(self, request: Request) -> StepOutput | None:
        """A constrained request gets its matcher: a copy of the grammar that `processor.prepare` compiled (a
        caller that skipped it compiles it here); or its refusal when the constraint does not compile."""
        if request.params.constraint is None:
            return None
        try:
            request.matcher = self.grammars.matcher(request.params.constraint)
        except InvalidRequest as error:
            return final_output(request, FinishReason.ERROR, str(error), ErrorCode.INVALID_REQUEST)
        return None

    def _admit(self, request: Request) -> StepOutput | None:
        with self._lock:
            if self._unavailable is not None:
                return final_output(request, FinishReason.ERROR, self._unavailable, ErrorCode.UNAVAILABLE)
            if not self._accepting:
                return final_output(
                    request,
                    FinishReason.SHUTDOWN,
                    "the service is shutting down; retry on another replica",
                    ErrorCode.SHUTDOWN,
                )
            if request.request_id in self._in_flight:
                return final_output(
                    request,
                    FinishReason.ERROR,
                    f"request id {request.request_id!r} is already in flight",
                    ErrorCode.INVALID_REQUEST,
                )
            capacity = self.config.max_running + self.config.max_waiting
            if len(self._in_flight) >= capacity:
                return final_output(
                    request,
                    FinishReason.ERROR,
                    f"the service is overloaded: {len(self._in_flight)} streams are running or queued "
                    f"(limit {capacity}); retry later",
                    ErrorCode.OVERLOADED,
                )
            self._in_flight.add(request.request_id)
            self._inbox.append(request)
            self._work.notify()
        return None

    def _report_finished(self, last_output: StepOutput) -> None:
        if self.on_finished is None:
            return
        try:
            self.on_finished(last_output)
        except Exception:  # counting must never end a stream
            log.exception("on_finished failed")

    # ---- the loop thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            # Here, not in __init__: the runner's first steps (its precisions timed) are the
            # loop thread's first OpenMP team, the only one kept (engine/openmp.py).
            try:
                self.runner.start()
                self.scheduler.keep_outputs = self.runner.decoded_kv_is_prefill_kv
            except Exception as error:
                log.exception("the runner failed to start")
                with self._lock:
                    self._unavailable = f"the engine failed to start: {type(error).__name__}"
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as error:  # a bug of the engine's own: end the streams in flight, serve the next
                    log.exception("engine step failed")
                    self._fail_in_flight(f"internal error in the engine: {type(error).__name__}")
                self._publish()
                self._dispatch()
            # Closing: nobody may be left waiting for an output that will never come.
            with self._lock:
                self._hand_over()
            for request in self.scheduler.abort_all():
                self._end(request, FinishReason.SHUTDOWN, "the service is shutting down", ErrorCode.SHUTDOWN)
            self.runner.reset()
            self._masks.close()
            self._publish()
            self._dispatch()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; hand submissions and cancellations to the scheduler. False once
        the engine is closing."""
        with self._lock:
            while not (self._stopping or self._inbox or self._cancels or self.scheduler.has_work):
                self._work.wait()
            if self._stopping:
                return False
            self._hand_over()
            return True

    def _hand_over(self) -> None:
        """Under the lock: submissions and cancellations since the last step go to the scheduler."""
        for request in self._inbox:
            self.scheduler.add(request)
        for request_id in self._cancels:
            self.scheduler.cancel(request_id)
        self._inbox.clear()
        self._cancels.clear()

    def _step(self) -> None:
        """One step: free, then one forward (a prefill or a decode), then the finished rows leave."""
        plan, freed = self.scheduler.schedule(time.perf_counter())
        for request in freed:
            self._processors.pop(request.request_id, None)
            self._end(request, FinishReason.CANCELLED)
        if plan.freed:
            self.runner.free(plan.freed)
        finished: list[str] = []
        prefill_failed = False
        if plan.prefill is not None:
            finished, prefill_failed = self._prefill(plan.prefill)
            self.steps += 1
        elif plan.decode:
            finished = self._decode(plan.decode)
            self.steps += 1
        self.scheduler.update(plan, finished, time.perf_counter(), prefill_failed)
        if finished:
            self.runner.free(finished, self.scheduler.kept_blocks())
            self.scheduler.commit_kept()

    def _prefill(self, plan: PrefillPlan) -> tuple[list[str], bool]:
        """Prefill the plan's chunks; once the prompts are complete, each gets its first token. Returns the
        requests that finished (their first token was their last, or they failed), and whether the prefill
        failed."""
        prefilling = {r.request_id: r for r in self.scheduler.prefilling}
        requests = [prefilling[rid] for rid in plan.request_ids]
        try:
            allowed = self._masks.start([r.matcher for r in requests] if plan.completes_prompts else [])
            logits = self.runner.prefill(plan)
            if not plan.completes_prompts:
                return [], False
            tokens, logprobs = sample_next_tokens(logits, requests, allowed.result())
        except Exception as error:  # these requests fail alone; the running batch goes on
            log.exception("prefill failed for %s", plan.request_ids)
            for request in requests:
                self._fail(request, f"internal error during prefill: {type(error).__name__}")
            return plan.request_ids, True
        for request in requests:
            self._processors[request.request_id] = self._output_processor(request, self)
        return self._emit(requests, tokens, logprobs), False

    def _decode(self, request_ids: Sequence[str]) -> list[str]:
        requests = [self.scheduler.running[rid] for rid in request_ids]
        self._last_decode_rows = len(requests)
        allowed = self._masks.start([r.matcher for r in requests])  # filled while the forward runs
        # A failure here leaves the shared cache unusable: the loop's guard fails every stream in flight.
        logits = self.runner.decode(request_ids, [r.output_ids[-1] for r in requests])
        return self._emit(requests, *sample_next_tokens(logits, requests, allowed.result()))

    def _emit(self, requests: list[Request], tokens: list[int], logprobs: list[TokenLogprobs | None]) -> list[str]:
        """Each request's output for its new token. Returns the requests that finished."""
        finished: list[str] = []
        for request, token, token_logprobs in zip(requests, tokens, logprobs):
            try:
                output = self._processors[request.request_id].on_token(token, token_logprobs)
            except Exception as error:  # e.g. detokenization: this stream fails, its neighbours go on
                log.exception("output processing failed for %s", request.request_id)
                output = final_output(
                    request,
                    FinishReason.ERROR,
                    f"internal error while processing a token: {type(error).__name__}",
                    ErrorCode.INTERNAL,
                )
            if output.finished:
                finished.append(request.request_id)
                del self._processors[request.request_id]
                self._release(request, output)
            else:
                self._outbox.append((request, output))
        return finished

    def _fail_in_flight(self, message: str) -> None:
        """End every prefilling and running request with an error; the batch state may be inconsistent, so the
        runner drops every row rather than trimming them one by one. Waiting requests start afresh."""
        self.runner.reset()
        self._processors.clear()
        for request in self.scheduler.abort_in_flight():
            self._fail(request, message)

    def _fail(self, request: Request, message: str) -> None:
        self._end(request, FinishReason.ERROR, message, ErrorCode.INTERNAL)

    def _end(
        self, request: Request, reason: FinishReason, message: str | None = None, code: ErrorCode | None = None
    ) -> None:
        self._release(request, final_output(request, reason, message, code))

    def _release(self, request: Request, last_output: StepOutput) -> None:
        self._outbox.append((request, last_output))
        self._released.append(request.request_id)
        self._report_finished(last_output)

    def _publish(self) -> None:
        """After a step, before its outputs go out: the counts other threads read, as one consistent snapshot
        (a caller that got its last output sees its request gone from them)."""
        with self._lock:
            self._in_flight.difference_update(self._released)
            self._running_rows = self.scheduler.num_running
            self._decode_rows = self._last_decode_rows if self.scheduler.running else 0
            self._kv_cache_tokens = kv_cache_positions(self.scheduler)
            if self.runner.prefix_cache is not None:
                self._prefix_cache_stats = self.runner.prefix_cache.snapshot()
            if not self._in_flight:
                self._idle.notify_all()
        self._released.clear()

    def _dispatch(self) -> None:
        """Hand this step's outputs to their consumers: one call per event loop, with all of that loop's outputs
        (a call per output woke the loop once per token per stream)."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, StepOutput]]] = {}
        for request, output in outbox:
            if request.consumer.loop is None:
                request.consumer.put(output)
            else:
                by_loop.setdefault(request.consumer.loop, []).append((request, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed: nobody reads these streams any more
                for request, output in items:
                    if not output.finished:
                        self.cancel(request.request_id)


def kv_cache_positions(scheduler: Scheduler) -> int:
    """Positions the batch's rows hold in the KV cache: a running row's prompt and every token but its newest
    (fed by the next decode step), a prefilling row's chunks so far."""
    running = sum(r.prompt_len + len(r.output_ids) - 1 for r in scheduler.running.values())
    return running + sum(r.prefilled for r in scheduler.prefilling)


def _put_all(items: list[tuple[Request, StepOutput]]) -> None:
    for request, output in items:
        request.consumer.put(output)


def make_runner(loaded: LoadedModel, config: EngineConfig, max_model_len: int) -> Runner:
    """The compact fast path for the models it handles exactly, the transformers model itself otherwise."""
    model = loaded.model
    if config.fast_path:
        from engine import fast  # its set-up only where it is used

        if fast.supports(model):
            dtype = (
                loaded.requested_dtype if loaded.requested_dtype == "auto" else str(loaded.dtype).removeprefix("torch.")
            )
            return fast.FastRunner(
                model,
                config.max_running,
                max_model_len,
                dtype,
                config.quantization,
                prefix_cache_mib=config.prefix_cache_mib,
                prefix_block_size=config.prefix_block_size,
            )
        log.info("the fast path does not handle %s: using the transformers model", type(model).__name__)
    if config.quantization != "none":
        raise ValueError(
            f"quantization={config.quantization!r} needs the fast path (engine/fast/), which does not handle "
            f"{type(model).__name__}: use quantization='none'"
        )
    # dtype auto loaded float32 weights for the fast path's sake; the transformers runner takes the CPU's best
    return CacheRunner(model, resolve_dtype("auto", loaded.device) if loaded.requested_dtype == "auto" else None)


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)
