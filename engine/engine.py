"""LLMEngine: one thread owns the model and runs the decode loop for every stream of the replica.

Callers on the event loop submit requests and read StepOutputs from a per-request asyncio queue; the loop
thread never touches the event loop except through call_soon_threadsafe, and the event loop never waits on
the model. Each iteration of `_loop` is one step:

    1. drop cancelled requests                       (a client that left frees its slot within one step)
    2. prefill: the waiting prompts that fit a token budget together, in one batched forward (or the next chunk
       of one prompt longer than the budget); they join the running batch with their first token
    3. decode one token for every running sequence   (one batched forward), unless more prompts wait for a free
       slot and the running sequences have paused for less than `max_decode_pause_s`: then prefill goes first
    4. emit one StepOutput per request, drop the finished rows

Prompts that start with the chat template's system turn reuse its KV cache (computed once): only the rest of
each prompt is prefilled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

import torch

from engine.loading import LoadedModel
from engine.output import RequestOutputProcessor, final_output
from engine.request import FinishReason, Request, SamplingParams, StepOutput
from engine.runner import DecodeBatch, ModelRunner, SharedPrefix
from engine.sampling import sample_next_tokens

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message says why and what the limit is."""


@dataclass
class EngineConfig:
    max_running: int = 32  # sequences decoded together in one batch
    max_waiting: int = 256  # requests queued beyond that; more are refused as overloaded
    # Prompt tokens (padding included) prefilled per step: bounds how long one prefill stalls the running streams.
    # On 2 CPU cores a forward costs about 60 ms plus 0.8 ms per token (python -m bench.trace): 192 splits a
    # burst of 16 chat prompts into two groups, the first of which streams sooner (smaller groups pay the 60 ms
    # too often: 96 and 128 measured slower).
    prefill_chunk: int = 192
    # While prompts wait for a free slot, prefill steps go before decode steps until the running sequences have
    # waited this long for their next token (plus the prefill step under way): a burst of arrivals gets its
    # first tokens sooner, at the price of one longer gap for the streams already running.
    max_decode_pause_s: float = 0.4
    max_model_len: Optional[int] = None  # prompt + new tokens; default: the model's own context, capped at 4096


@dataclass
class _Prefill:
    """Prompts being prefilled together: rows of a batch that joins the running one once every prompt is in."""

    requests: list[Request]
    batch: DecodeBatch


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.runner = ModelRunner(loaded.model)
        model_context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = self.config.max_model_len or min(model_context, 4096)
        self.eos_token_ids = _eos_token_ids(loaded)
        self._prefix_ids = self._chat_template_head()
        self.shared_prefix: SharedPrefix | None = None  # computed by the loop thread before its first step

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)  # notified when the last request in flight finishes
        self._inbox: list[Request] = []  # submitted, not yet seen by the loop thread
        self._cancelled: set[str] = set()
        self._in_flight = 0  # submitted and not finished: what admission control counts
        self._accepting = True
        self._stopping = False
        self._ids = itertools.count()
        # Called on the loop thread with the last output of every request, refusals included, also when nobody
        # reads the stream any more: where finished requests are counted (the executor's metrics).
        self.on_finished: Callable[[StepOutput], None] | None = None

        # Owned by the loop thread alone.
        self._waiting: deque[Request] = deque()
        self._prefilling: _Prefill | None = None  # a prompt longer than the budget, prefilled over several steps
        self._running: dict[str, RequestOutputProcessor] = {}
        self._batch: DecodeBatch | None = None
        self._batch_stepped_at = 0.0  # when the running batch last got a token (a decode step, or its first prefill)
        self.steps = 0

        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (any thread / the event loop) ----

    @property
    def num_running(self) -> int:
        prefilling = self._prefilling
        return len(self._running) + (len(prefilling.requests) if prefilling else 0)

    @property
    def num_waiting(self) -> int:
        return max(0, self._in_flight - self.num_running)

    def tokenize(self, prompt: str, chat_template: bool | None = None) -> list[int]:
        """Prompt text to ids; the tokenizer's chat template applies unless turned off or absent."""
        use_template = chat_template is not False and self.tokenizer.chat_template is not None
        if use_template:
            encoded = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(encoded["input_ids"])
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def _chat_template_head(self) -> list[int]:
        """The token ids every chat-templated prompt starts with (the system turn): where the template applied to
        two different messages stops agreeing. Empty without a chat template."""
        if self.tokenizer.chat_template is None:
            return []
        one, other = self.tokenize("a", True), self.tokenize("b", True)
        common = 0
        while common < min(len(one), len(other)) and one[common] == other[common]:
            common += 1
        return one[:common]

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty after tokenization")
        if params.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {params.max_tokens}")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens "
                "(prompt + max_tokens), so the prompt must be shorter"
            )
        if params.max_tokens > room:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.max_model_len} tokens: max_tokens can be at most {room} for this prompt"
            )
        if not math.isfinite(params.temperature) or params.temperature < 0:
            raise InvalidRequest(f"temperature must be a number >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        owner: asyncio.Task | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one request. Leaving the iteration early (a break, a cancelled task) cancels the
        request in the engine, and so does the end of `owner`, a task that reads the stream for its whole life,
        even if it never closes the iteration. Never raises for the request's own failures: the last output says
        what happened."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        request_id = request_id or f"req-{next(self._ids)}"

        def deliver(output: StepOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:  # the consumer's event loop has closed: nobody reads this stream any more
                self.cancel(request_id)

        request = Request(request_id, prompt_ids, params, deliver)
        refusal = self._submit(request)
        if refusal is not None:
            yield refusal
            return
        finished = False

        def cancel_with_owner(_owner: asyncio.Task) -> None:
            self.cancel(request_id)  # a no-op once the request has finished

        if owner is not None:
            owner.add_done_callback(cancel_with_owner)
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if owner is not None:
                owner.remove_done_callback(cancel_with_owner)
            if not finished:
                self.cancel(request_id)

    def run_to_completion(self, prompt_ids: list[int], params: SamplingParams) -> list[StepOutput]:
        """Blocking generation for callers without an event loop (warm-up, scripts)."""
        outputs: list[StepOutput] = []
        done = threading.Event()

        def deliver(output: StepOutput) -> None:
            outputs.append(output)
            if output.finished:
                done.set()

        request = Request(f"req-{next(self._ids)}", prompt_ids, params, deliver)
        refusal = self._submit(request)
        if refusal is not None:
            return [refusal]
        done.wait()
        return outputs

    def _submit(self, request: Request) -> StepOutput | None:
        """Queue the request; or return its refusal, its only output."""
        refusal = self._admit(request)
        if refusal is not None:
            self._report_finished(refusal)
        return refusal

    def _admit(self, request: Request) -> StepOutput | None:
        with self._lock:
            if not self._accepting:
                return final_output(request, FinishReason.SHUTDOWN, "the service is shutting down; retry on another replica")
            capacity = self.config.max_running + self.config.max_waiting
            if self._in_flight >= capacity:
                return final_output(
                    request,
                    FinishReason.ERROR,
                    f"the service is overloaded: {self._in_flight} streams are running or queued "
                    f"(limit {capacity}); retry later",
                )
            self._in_flight += 1
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

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._work.notify()

    def shutdown(self, grace_s: float) -> None:
        """Refuse new requests at once, give the ones in flight up to `grace_s` seconds to finish, then end the
        rest with finish_reason=shutdown and stop. Blocks: call it off the event loop."""
        with self._lock:
            self._accepting = False
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=grace_s)
        self.close()

    def close(self) -> None:
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._work.notify()
        self._thread.join(timeout=30)

    # ---- the loop thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            # Here, not in __init__: torch ops on a second thread start a second OpenMP thread team, and on a
            # 2-core CPU the two teams measured a decode step 70% slower (40 -> 68 ms for one stream).
            if self._prefix_ids:
                self.shared_prefix = self.runner.shared_prefix(self._prefix_ids)
            while True:
                with self._lock:
                    while not self._has_work():
                        self._work.wait()
                    if self._stopping:
                        break
                    self._take_inbox()
                    cancelled, self._cancelled = self._cancelled, set()
                try:
                    self._drop(cancelled)
                    self._prefill_step()
                    if self._batch is not None and not self._prefill_goes_first():
                        self._decode_step()
                except Exception as error:  # a bug of the engine's own: end the streams in flight, serve the next
                    log.exception("engine step failed")
                    self._fail_in_flight(f"internal error in the engine: {error!r}")
                self.steps += 1
            # Closing: nobody may be left waiting for an output that will never come.
            with self._lock:
                self._take_inbox()
            self._finish_all(FinishReason.SHUTDOWN, "the service is shutting down")

    def _take_inbox(self) -> None:
        """Under the lock: requests submitted since the last look join the waiting queue."""
        self._waiting.extend(self._inbox)
        self._inbox.clear()

    def _prefill_goes_first(self) -> bool:
        """Skip this decode step so that prompts waiting for a free slot are prefilled sooner (TGI's router and
        vLLM's v0 scheduler also put prefill first): a waiting client has nothing yet, a running one is mid-answer."""
        with self._lock:
            self._take_inbox()
        more_to_prefill = self._prefilling is not None or (
            bool(self._waiting) and len(self._running) < self.config.max_running
        )
        paused_s = time.perf_counter() - self._batch_stepped_at
        return more_to_prefill and paused_s < self.config.max_decode_pause_s

    def _has_work(self) -> bool:
        return bool(
            self._stopping or self._inbox or self._cancelled
            or self._waiting or self._prefilling is not None or self._batch is not None
        )

    def _prefill_step(self) -> None:
        """Spend up to `prefill_chunk` prompt tokens this step: the waiting prompts that fit together, in one
        forward, or the next chunk of a prompt longer than the budget (decode steps run in between)."""
        budget = self.config.prefill_chunk
        job = self._prefilling or self._schedule(budget)
        if job is None:
            return
        chunks = [r.prompt_ids[r.prefilled : r.prefilled + budget] for r in job.requests]
        try:
            logits = self.runner.prefill(job.batch, chunks)
        except Exception as error:  # these requests fail alone; the engine serves the others
            log.exception("prefill failed for %s", [r.request_id for r in job.requests])
            self._prefilling = None
            for request in job.requests:
                self._fail(request, f"internal error during prefill: {error!r}")
            return
        for request, chunk in zip(job.requests, chunks):
            request.prefilled += len(chunk)
        if all(r.prefilled == r.prompt_len for r in job.requests):
            self._prefilling = None
            self._start_decoding(job, logits)
        else:
            self._prefilling = job

    def _schedule(self, budget: int) -> _Prefill | None:
        """Take the oldest waiting prompts that fit the budget side by side (padded to the longest) into free
        batch slots. Rows of one prefill share one cached prefix, or none. The oldest prompt always goes, chunked
        when it alone exceeds the budget."""
        slots = self.config.max_running - len(self._running)
        if not self._waiting or slots <= 0:
            return None
        prefix = self._prefix_of(self._waiting[0])
        skip = 0 if prefix is None else len(prefix.token_ids)
        group: list[Request] = []
        width = 0
        for request in self._waiting:
            rest = request.prompt_len - skip
            if len(group) == slots or self._prefix_of(request) is not prefix:
                break
            if group and max(width, rest) * (len(group) + 1) > budget:
                break
            group.append(request)
            width = max(width, rest)
        now = time.perf_counter()
        for request in group:
            self._waiting.popleft()
            request.scheduled_at = now
            request.prefilled = skip
        return _Prefill(group, self.runner.new_batch([r.request_id for r in group], prefix))

    def _prefix_of(self, request: Request) -> SharedPrefix | None:
        prefix = self.shared_prefix
        return prefix if prefix is not None and prefix.starts(request.prompt_ids) else None

    def _start_decoding(self, job: _Prefill, logits: torch.Tensor) -> None:
        """Each prompt's first token, then the new rows join the running batch (all at once: one cache copy)."""
        try:
            tokens = sample_next_tokens(logits, job.requests)
        except Exception as error:  # these requests fail alone; the running batch goes on
            log.exception("sampling the first token failed for %s", [r.request_id for r in job.requests])
            for request in job.requests:
                self._fail(request, f"internal error while sampling the first token: {error!r}")
            return
        processors = [RequestOutputProcessor(r, self.tokenizer, self.eos_token_ids) for r in job.requests]
        for processor in processors:
            self._running[processor.request.request_id] = processor
        done = self._emit(processors, tokens)
        job.batch.next_input_ids = torch.tensor(tokens, device=job.batch.next_input_ids.device)
        joining = self.runner.remove(job.batch, done) if done else job.batch
        if joining is not None:
            if self._batch is None:
                self._batch_stepped_at = time.perf_counter()
            self._batch = self.runner.merge(self._batch, joining)

    def _decode_step(self) -> None:
        batch = self._batch
        processors = [self._running[rid] for rid in batch.request_ids]
        # A failure here leaves the shared cache unusable: the loop's guard fails every stream in flight.
        logits = self.runner.decode(batch)
        tokens = sample_next_tokens(logits, [p.request for p in processors])
        done = self._emit(processors, tokens)
        self._batch_stepped_at = time.perf_counter()
        batch.next_input_ids = torch.tensor(tokens, device=batch.next_input_ids.device)
        if done:
            self._batch = self.runner.remove(batch, done)

    def _emit(self, processors: list[RequestOutputProcessor], tokens: list[int]) -> set[str]:
        """Hand each running request the output for its new token. Returns the requests that finished (released
        and no longer running); their rows are still in the batch."""
        done: set[str] = set()
        for processor, token in zip(processors, tokens):
            request = processor.request
            try:
                output = processor.on_token(token)
            except Exception as error:  # e.g. detokenization: this stream fails, its neighbours go on
                log.exception("output processing failed for %s", request.request_id)
                output = final_output(request, FinishReason.ERROR, f"internal error while processing a token: {error!r}")
            if output.finished:
                done.add(request.request_id)
                del self._running[request.request_id]
                self._release(request, output)
            else:
                request.deliver(output)
        return done

    def _drop(self, request_ids: set[str], reason: FinishReason = FinishReason.CANCELLED, message: str | None = None) -> None:
        if not request_ids:
            return
        for request in [r for r in self._waiting if r.request_id in request_ids]:
            self._waiting.remove(request)
            self._release(request, final_output(request, reason, message))
        job = self._prefilling
        if job is not None and request_ids & {r.request_id for r in job.requests}:
            for request in [r for r in job.requests if r.request_id in request_ids]:
                job.requests.remove(request)
                self._release(request, final_output(request, reason, message))
            job.batch = self.runner.remove(job.batch, request_ids)
            self._prefilling = job if job.requests else None
        running = request_ids & self._running.keys()
        for rid in running:
            request = self._running.pop(rid).request
            self._release(request, final_output(request, reason, message))
        if running:
            self._batch = self.runner.remove(self._batch, running)

    def _finish_all(self, reason: FinishReason, message: str) -> None:
        prefilling = {r.request_id for r in self._prefilling.requests} if self._prefilling else set()
        everyone = {r.request_id for r in self._waiting} | prefilling | self._running.keys()
        self._drop(set(everyone), reason, message)

    def _fail_in_flight(self, message: str) -> None:
        """End every prefilling and running request with an error; the batch state may be inconsistent, so it
        is dropped rather than trimmed row by row. Waiting requests are untouched and start afresh."""
        in_flight = [p.request for p in self._running.values()]
        if self._prefilling is not None:
            in_flight += self._prefilling.requests
        self._running.clear()
        self._prefilling = None
        self._batch = None
        for request in in_flight:
            self._fail(request, message)

    def _fail(self, request: Request, message: str) -> None:
        self._release(request, final_output(request, FinishReason.ERROR, message))

    def _release(self, request: Request, last_output: StepOutput) -> None:
        request.deliver(last_output)
        self._report_finished(last_output)
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)
