"""What goes into the engine (a request) and what comes out of it (one StepOutput per decode step)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler handles requests without torch
    import torch

    from engine.structured import GrammarMatcher


class FinishReason(str, Enum):
    LENGTH = "length"  # max_tokens reached
    EOS = "eos"  # the model emitted an end-of-sequence token, or its constraint allows nothing more
    STOP = "stop"  # a stop string appeared
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"  # this request failed or was refused (e.g. overload); the others carry on
    SHUTDOWN = "shutdown"  # the service is shutting down


class ErrorCode(str, Enum):
    """Why a request failed, for machines: transports map it to a status (HTTP 400/429/503/500, ...)."""

    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked; the message names the limit
    OVERLOADED = "overloaded"  # the replica is full: retry later
    SHUTDOWN = "shutdown"  # the replica is shutting down: retry on another one
    UNAVAILABLE = "unavailable"  # the engine cannot serve now (not started, died)
    INTERNAL = "internal"  # a bug of ours; the other streams carry on


class ConstraintKind(str, Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    GRAMMAR = "grammar"  # llguidance's Lark dialect


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must match (engine/structured.py); also the key of the compiled grammars' cache."""

    kind: ConstraintKind
    source: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Logits processing, in OpenAI's sense for the first three: over the tokens generated so far, a token's logit
    # drops by presence_penalty once it has appeared and by frequency_penalty per appearance; logit_bias adds to
    # chosen tokens' logits. repetition_penalty (CTRL, as in transformers and TGI) divides the positive logits
    # of every token of the prompt and the output so far, and multiplies the negative ones.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False  # report the chosen token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives (0-20)
    constraint: Constraint | None = None  # structured output: only tokens its grammar allows are sampled

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def processes_logits(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Log probabilities from the model's own distribution (before penalties, bias and temperature), as OpenAI
    reports them: the chosen token's, and the most likely tokens' in descending order."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass
class StepOutput:
    request_id: str
    token_id: int  # -1 when no token belongs to this output (an error or a refusal)
    text: str  # text this step added
    generated_text: str  # all text so far
    index: int
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: ErrorCode | None = None  # set with `error`
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead of a prefill
    queue_time_s: float | None = None
    time_to_first_token_s: float | None = None
    total_time_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Consumer:
    """Where a request's outputs go. `put` runs on `loop` (the engine hands each loop all of a step's outputs in
    one call), or on the engine thread when `loop` is None (a blocking caller)."""

    put: Callable[[StepOutput], None]
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class Request:
    """A request's whole life inside the engine. Only the engine thread mutates it after submission."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    consumer: Consumer
    arrival: float = field(default_factory=time.perf_counter)
    prefilled: int = 0  # prompt tokens already in the request's row (chunked prefill, the prefix cache)
    cached_tokens: int = 0  # of those, the ones copied from the prefix cache
    output_ids: list[int] = field(default_factory=list)
    generated_text: str = ""
    scheduled_at: float | None = None
    first_token_at: float | None = None
    generator: torch.Generator | None = None  # per-request RNG, so a seed reproduces the same sample
    matcher: GrammarMatcher | None = None  # where a constrained request stands in its grammar

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)
