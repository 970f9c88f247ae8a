"""Turning each new token of a request into a StepOutput: detokenize, apply stop strings, decide the end."""

from __future__ import annotations

import time

from transformers import PreTrainedTokenizerBase

from engine.detokenizer import IncrementalDetokenizer
from engine.request import ErrorCode, FinishReason, Request, StepOutput, TokenLogprobs
from engine.stopping import StopStringMatcher


class RequestOutputProcessor:
    def __init__(self, request: Request, tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int]) -> None:
        self.request = request
        self.eos_token_ids = eos_token_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_matcher = StopStringMatcher(list(request.params.stop)) if request.params.stop else None

    def on_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> StepOutput:
        request = self.request
        request.output_ids.append(token_id)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if request.matcher is not None:
            request.matcher.accept(token_id)
        finish: FinishReason | None = None
        if token_id in self.eos_token_ids:
            finish = FinishReason.EOS
            piece = self.detokenizer.flush()
        else:
            piece = self.detokenizer.add(token_id)
            if request.matcher is not None and request.matcher.complete:  # the only token left to allow is EOS
                finish = FinishReason.EOS
            elif len(request.output_ids) >= request.params.max_tokens:
                finish = FinishReason.LENGTH
            if finish is not None:
                piece += self.detokenizer.flush()
        if self.stop_matcher is not None:
            piece, hit_stop = self.stop_matcher.push(piece)
            if hit_stop:
                finish = FinishReason.STOP
            elif finish is not None:
                piece += self.stop_matcher.flush()
        request.generated_text += piece
        return self._output(token_id, piece, finish, logprobs)

    def _output(
        self, token_id: int, piece: str, finish: FinishReason | None, logprobs: TokenLogprobs | None
    ) -> StepOutput:
        output = StepOutput(
            request_id=self.request.request_id,
            token_id=token_id,
            text=piece,
            generated_text=self.request.generated_text,
            index=len(self.request.output_ids) - 1,
            finish_reason=finish,
            logprobs=logprobs,
        )
        return finalize(output, self.request) if finish is not None else output


def finalize(output: StepOutput, request: Request) -> StepOutput:
    """Attach usage and timings to a request's last output."""
    now = time.perf_counter()
    output.prompt_tokens = request.prompt_len
    output.completion_tokens = len(request.output_ids)
    output.cached_tokens = request.cached_tokens
    if request.scheduled_at is not None:
        output.queue_time_s = request.scheduled_at - request.arrival
    if request.first_token_at is not None:
        output.time_to_first_token_s = request.first_token_at - request.arrival
    output.total_time_s = now - request.arrival
    return output


def final_output(
    request: Request, reason: FinishReason, error: str | None = None, code: ErrorCode | None = None
) -> StepOutput:
    """A last output that carries no token: an error, a cancellation, a refusal, a shutdown."""
    output = StepOutput(
        request_id=request.request_id,
        token_id=-1,
        text="",
        generated_text=request.generated_text,
        index=len(request.output_ids),
        finish_reason=reason,
        error=error,
        error_code=code,
    )
    return finalize(output, request)
