"""A TokenStreamingExecutor whose engine fails the output processing of the 3rd token of any prompt containing
FAULT: an internal failure inside one stream's step, in a real flow, injected through the executor's
`build_engine` seam and the engine's `output_processor` seam.

The 3rd token is produced by a batched decode step (the 1st comes from the prefill). The answer names only the
kind of failure, so the processor writes how many streams that decode step served to `fault_log`: a test can
prove that the other streams were in the same batch when the fault struck instead of assuming it from timing."""

from __future__ import annotations

from pathlib import Path

from engine import EngineConfig, LLMEngine, LoadedModel, StepOutput, TokenLogprobs
from engine.output import RequestOutputProcessor
from engine.request import Request
from executor import TokenStreamingExecutor

FAULT_MARKER = "FAULT"


class FaultyOutputProcessor(RequestOutputProcessor):
    def __init__(self, request: Request, engine: LLMEngine, fault_log: Path) -> None:
        super().__init__(request, engine.tokenizer, engine.eos_token_ids)
        self.engine, self.fault_log = engine, fault_log
        self.faulty = FAULT_MARKER in engine.tokenizer.decode(request.prompt_ids)

    def on_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> StepOutput:
        if self.faulty and len(self.request.output_ids) == 2:
            # Runs on the engine thread inside the decode step: the running rows are the rows being decoded.
            self.fault_log.write_text(
                f"injected fault in a decode step of {len(self.engine.scheduler.running)} streams"
            )
            raise RuntimeError("injected fault")
        return super().on_token(token_id, logprobs)


class FaultyTokenStreamingExecutor(TokenStreamingExecutor):
    def __init__(self, fault_log: str, **kwargs) -> None:
        self.fault_log = Path(fault_log)
        super().__init__(**kwargs)

    def build_engine(self, loaded: LoadedModel, config: EngineConfig) -> LLMEngine:
        return LLMEngine(
            loaded,
            config,
            output_processor=lambda request, engine: FaultyOutputProcessor(request, engine, self.fault_log),
        )
