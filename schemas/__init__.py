"""The service contract. Two-field clients of the seed tutorial keep working: every field beyond
`prompt`/`max_tokens` and `token_id`/`generated_text` is optional with a default."""

# No `from __future__ import annotations`: Jina rebuilds these models from their annotations for its endpoint
# discovery, where a string such as 'list[ChatMessage] | None' cannot be resolved.
import json
from enum import Enum

from docarray import BaseDoc
from docarray.typing import NdArray
from pydantic import validator


class ErrorCode(str, Enum):
    """Why a stream failed, for machines (`ModelOutputDocument.error_code`): transports map it to a status, clients
    decide whether to retry. The engine's own codes (engine.ErrorCode) have the same values."""

    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked; `error` names the limit (HTTP 400)
    OVERLOADED = "overloaded"  # the replica is full: retry later (HTTP 429)
    SHUTDOWN = "shutdown"  # the replica is shutting down: retry on another one (HTTP 503)
    UNAVAILABLE = "unavailable"  # the engine or the executor cannot serve now (HTTP 503)
    INTERNAL = "internal"  # a bug of the service's own; the other streams carry on (HTTP 500)


class ToolSyntax(str, Enum):
    """A chat template's own syntax of tool calls (`ModelInfoDocument.tool_format`). The engine's names
    (engine/prompts.py) are these values."""

    HERMES = "hermes"  # Hermes, Qwen2.5, Qwen3: <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>


class ToolCall(BaseDoc):
    """A call an assistant's message made, for a chat template with a tool syntax of its own."""

    call_id: str  # OpenAI's `id` (BaseDoc has an `id` of its own)
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ChatMessage(BaseDoc):
    """One turn of a conversation. The model's chat template decides which roles it takes (system, user and
    assistant for the embedded model; `tool` too where the template has a tool syntax, ModelInfoDocument's
    `tool_format`); the executor refuses others, naming the message."""

    role: str
    content: str
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's result: the call it answers


class PromptDocument(BaseDoc):
    # Exactly one of the two: a text (the seed tutorial's field: the user's message when the chat template
    # applies), or a whole conversation, to which the chat template is applied turn by turn.
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int
    # Generation settings live here, not in Jina `parameters`: those never reach a streaming endpoint.
    chat_template: bool | None = None  # None: the service default (apply the template when the tokenizer has one)
    stop: list[str] | None = None  # text that ends generation; the stop text itself is never sent
    temperature: float | None = None  # None or 0: greedy (the default)
    top_p: float | None = None
    seed: int | None = None
    # Logits processing (OpenAI's semantics; the engine checks the ranges and names the limit).
    presence_penalty: float | None = None  # -2..2: subtracted once from the logit of every token generated so far
    frequency_penalty: float | None = None  # -2..2: subtracted per occurrence
    repetition_penalty: float | None = None  # > 0 (1: none), CTRL's, over the prompt and the output
    logit_bias: dict[str, float] | None = None  # token id (as text, as OpenAI sends it) -> -100..100 added to its logit
    # Log probabilities on each ModelOutputDocument: the chosen token's (`logprob`) and the `top_logprobs` (0-20)
    # most likely alternatives (`top_token_ids`, `top_logprobs`).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Structured output: at most one of the three. Every token is sampled among those the constraint allows, so the
    # answer matches it by construction (engine/structured.py, llguidance); a cut at max_tokens may end it early.
    json_schema: str | None = None  # a JSON Schema (a dict is accepted and kept as its JSON text)
    regex: str | None = None  # the whole answer matches it
    grammar: str | None = None  # a grammar in llguidance's Lark dialect (docs/structured-outputs.md)
    # OpenAI's tools ([{"type": "function", "function": {...}}], a list is accepted and kept as its JSON text), for
    # the chat template to render, where it has a tool syntax of its own (ModelInfoDocument's `tool_format`).
    tools: str | None = None

    @validator("json_schema", "tools", pre=True)
    def _json_as_text(cls, value):
        # As text, because protobuf's Struct would carry a dict's integers as floats ("maxItems": 3.0).
        return json.dumps(value) if isinstance(value, dict | list) else value


class ModelOutputDocument(BaseDoc):
    token_id: int
    generated_text: str  # all text so far
    text: str = ""  # what this step added to generated_text (may be empty while a character is incomplete)
    index: int = 0  # 0-based step number
    finish_reason: str | None = None  # set on the last document only: length, eos, stop, error, cancelled, ...
    error: str | None = None  # with finish_reason='error' (or 'shutdown'): what went wrong, in words
    error_code: str | None = None  # with `error`: an ErrorCode value, for machines
    # When the prompt asked for logprobs: from the model's own distribution (before penalties, bias and
    # temperature), so a client can sample or score on its side. `token` is this step's token as text (its own
    # decoding, which `text` may hold back while a character is incomplete); `top_tokens` the alternatives' texts.
    token: str | None = None
    logprob: float | None = None
    top_token_ids: NdArray | None = None  # int64, most likely first
    top_logprobs: NdArray | None = None  # float32, descending, aligned with top_token_ids
    top_tokens: list[str] | None = None
    # Usage and timings, on the last document only.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, those whose KV came from the prefix cache
    queue_time_s: float | None = None
    time_to_first_token_s: float | None = None
    total_time_s: float | None = None


class ModelInfoDocument(BaseDoc):
    """What the executor serves (its `/info` endpoint fills in the document it is sent): the gateway learns the
    model's id from it instead of a setting of its own."""

    model: str = ""  # the id OpenAI clients name: a hub id, a local directory's name, or the embedded model's
    max_model_len: int = 0  # prompt + max_tokens limit, in tokens
    fingerprint: str = ""  # changes with the model, its precision or its device: OpenAI's system_fingerprint
    # The chat template's own tool-call syntax, a ToolSyntax value; None: it has none (or the executor predates the
    # field), and the OpenAI API renders tools in its generic format.
    tool_format: str | None = None
    # The syntax's tags that are tokens of their own: a grammar names them as tokens (`<tool_call>`), not as text.
    tool_tokens: list[str] | None = None


def json_or_text(text: str):
    """A call's arguments (JSON text, as OpenAI sends them) as the JSON value they hold, for a template to write as
    JSON; text that is not JSON as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def error_document(message: str, code: ErrorCode) -> ModelOutputDocument:
    """The last (and here only) document of a stream that failed: no token, finish_reason='error'."""
    return ModelOutputDocument(
        token_id=-1, generated_text="", finish_reason="error", error=message, error_code=code.value
    )
