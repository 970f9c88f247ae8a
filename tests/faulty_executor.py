"""A TokenStreamingExecutor whose output processing fails on the 3rd token of any prompt containing FAULT:
an internal failure inside one stream's step, in a real flow.

The 3rd token is produced by a batched decode step (the 1st comes from the prefill), and the fault's message
says how many streams that decode step served, so a test can prove that the other streams were in the same
batch when the fault struck instead of assuming it from timing."""

from __future__ import annotations

import engine.engine
from engine.engine import LLMEngine
from engine.output import RequestOutputProcessor
from engine.request import StepOutput
from executor import TokenStreamingExecutor

FAULT_MARKER = "FAULT"


class FaultyOutputProcessor(RequestOutputProcessor):
    engine: LLMEngine | None = None  # set once the executor has built its engine (after warm-up)

    def on_token(self, token_id: int) -> StepOutput:
        prompt = self.detokenizer.tokenizer.decode(self.request.prompt_ids)
        if FAULT_MARKER in prompt and len(self.request.output_ids) == 2:
            # Runs on the engine thread, inside the decode step: the batch being decoded is the engine's batch.
            batch = self.engine._batch if self.engine is not None else None
            raise RuntimeError(f"injected fault in a decode step of {len(batch) if batch else 0} streams")
        return super().on_token(token_id)


engine.engine.RequestOutputProcessor = FaultyOutputProcessor


class FaultyTokenStreamingExecutor(TokenStreamingExecutor):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        FaultyOutputProcessor.engine = self.engine
