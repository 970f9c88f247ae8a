"""A TokenStreamingExecutor whose engine spends at least `pace_s` on each token of every stream, through the
engine's `output_processor` seam: a test that acts while a stream still runs (cancels it from another gateway)
gets a stream that lasts as long as it asks, however fast the model is on the machine. On the tiny model 3000
tokens took about 3 s, and a cancel sent through a second gateway and Redis sometimes came after the end."""

from __future__ import annotations

import time

from engine import EngineConfig, LLMEngine, LoadedModel, StepOutput, TokenLogprobs
from engine.output import RequestOutputProcessor
from engine.request import Request
from executor import TokenStreamingExecutor


class PacedOutputProcessor(RequestOutputProcessor):
    def __init__(self, request: Request, engine: LLMEngine, pace_s: float) -> None:
        super().__init__(request, engine.tokenizer, engine.eos_token_ids)
        self.pace_s = pace_s

    def on_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> StepOutput:
        time.sleep(self.pace_s)  # on the engine thread, between two steps' outputs: the stream's pace
        return super().on_token(token_id, logprobs)


class PacedTokenStreamingExecutor(TokenStreamingExecutor):
    def __init__(self, pace_s: float, **kwargs) -> None:
        self.pace_s = pace_s
        super().__init__(**kwargs)

    def build_engine(self, loaded: LoadedModel, config: EngineConfig) -> LLMEngine:
        return LLMEngine(
            loaded, config, output_processor=lambda request, engine: PacedOutputProcessor(request, engine, self.pace_s)
        )
