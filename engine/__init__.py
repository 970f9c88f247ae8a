"""The generation engine: batching scheduler, KV cache, sampling, stop conditions and incremental
detokenization. It imports neither jina nor docarray, so it can be driven, tested and benchmarked alone."""

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loading import EMBEDDED, LoadedModel, load_model
from engine.prompts import InvalidRequest, Prompt, Tools
from engine.request import (
    Constraint,
    ConstraintKind,
    ErrorCode,
    FinishReason,
    SamplingParams,
    StepOutput,
    TokenLogprobs,
)

__all__ = [
    "Constraint",
    "ConstraintKind",
    "EMBEDDED",
    "EngineConfig",
    "ErrorCode",
    "FinishReason",
    "InvalidRequest",
    "LLMEngine",
    "LoadedModel",
    "Prompt",
    "SamplingParams",
    "StepOutput",
    "TokenLogprobs",
    "Tools",
    "load_model",
]
