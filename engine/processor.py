"""The engine's input processor (vLLM v1's Processor): a prompt to token ids, checked against every limit before
the request reaches the engine thread. It runs on the caller's thread (tokenizing a long prompt takes a while)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from engine.config import EngineConfig
from engine.loading import LoadedModel
from engine.prompts import InvalidRequest, Prompt, PromptEncoder, Tools
from engine.request import SamplingParams
from engine.stopping import compile_stops
from engine.structured import Grammars

MAX_TOP_LOGPROBS = 20  # as OpenAI


class InputProcessor:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, grammars: Grammars) -> None:
        self.config = config
        self.grammars = grammars
        self.tokenizer = loaded.tokenizer
        model_context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = config.max_model_len or min(model_context, 4096)
        self.max_prompt_chars = config.max_prompt_chars or 16 * self.max_model_len
        self.prompts = PromptEncoder(loaded.tokenizer)

    def prepare(self, prompt: Prompt, params: SamplingParams, chat_template: bool | None = None,
                tools: Tools | None = None) -> list[int]:
        """Everything a request needs before `generate`, off the event loop and the engine thread (it blocks:
        tokenizing a long prompt takes a while): the prompt's ids, checked against the limits. `prompt` is a text
        or a conversation (messages with a role and a content); `tools` go into the chat template (where it has a
        tool syntax). Raises InvalidRequest naming the limit."""
        characters = prompt_characters(prompt, tools)
        if characters > self.max_prompt_chars:
            raise InvalidRequest(
                f"the prompt is {characters} characters; the limit is {self.max_prompt_chars} characters"
            )
        self.check_stop(params.stop)
        prompt_ids = self.tokenize(prompt, chat_template, tools)
        self.check(prompt_ids, params)
        # Here rather than on the engine thread when the request starts decoding.
        compile_stops(params.stop)
        if params.constraint is not None:
            self.grammars.check(params.constraint)
        return prompt_ids

    def tokenize(self, prompt: Prompt, chat_template: bool | None = None, tools: Tools | None = None) -> list[int]:
        return self.prompts.encode(prompt, chat_template, tools)

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
        self.check_stop(params.stop)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(params, name)
            if not -2 <= value <= 2:  # NaN fails too
                raise InvalidRequest(f"{name} must be between -2 and 2, got {value}")
        if not 0 < params.repetition_penalty < math.inf:
            raise InvalidRequest(f"repetition_penalty must be a number > 0, got {params.repetition_penalty}")
        vocab = len(self.tokenizer)
        for token_id, bias in params.logit_bias:
            if not 0 <= token_id < vocab:
                raise InvalidRequest(f"logit_bias names token {token_id}; token ids go from 0 to {vocab - 1}")
            if not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias for token {token_id} must be between -100 and 100, got {bias}")
        if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {params.top_logprobs}")

    def check_stop(self, stop: Sequence[str]) -> None:
        if len(stop) > self.config.max_stop_strings:
            raise InvalidRequest(f"{len(stop)} stop strings given; the limit is {self.config.max_stop_strings}")
        longest = max(map(len, stop), default=0)
        if longest > self.config.max_stop_length:
            raise InvalidRequest(
                f"a stop string is {longest} characters; the limit is {self.config.max_stop_length} characters"
            )


def prompt_characters(prompt: Prompt, tools: Tools | None) -> int:
    """What the limit on a prompt's characters counts: its texts, and the calls and tools the template writes."""
    if isinstance(prompt, str):
        texts = len(prompt)
    else:
        texts = sum(len(str(m.get("content", ""))) + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
                    for m in prompt)
    return texts + (len(json.dumps(tools)) if tools else 0)
