"""The service contract. Two-field clients of the seed tutorial keep working: every field beyond
`prompt`/`max_tokens` and `token_id`/`generated_text` is optional with a default."""

from __future__ import annotations

from enum import Enum

from docarray import BaseDoc


class ErrorCode(str, Enum):
    """Why a stream failed, for machines (`ModelOutputDocument.error_code`): transports map it to a status, clients
    decide whether to retry. The engine's own codes (engine.ErrorCode) have the same values."""

    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked; `error` names the limit (HTTP 400)
    OVERLOADED = "overloaded"  # the replica is full: retry later (HTTP 429)
    SHUTDOWN = "shutdown"  # the replica is shutting down: retry on another one (HTTP 503)
    UNAVAILABLE = "unavailable"  # the engine or the executor cannot serve now (HTTP 503)
    INTERNAL = "internal"  # a bug of the service's own; the other streams carry on (HTTP 500)


class PromptDocument(BaseDoc):
    prompt: str
    max_tokens: int
    # Generation settings live here, not in Jina `parameters`: those never reach a streaming endpoint.
    chat_template: bool | None = None  # None: the service default (apply the template when the tokenizer has one)
    stop: list[str] | None = None  # text that ends generation; the stop text itself is never sent
    temperature: float | None = None  # None or 0: greedy (the default)
    top_p: float | None = None
    seed: int | None = None


class ModelOutputDocument(BaseDoc):
    token_id: int
    generated_text: str  # all text so far
    text: str = ""  # what this step added to generated_text (may be empty while a character is incomplete)
    index: int = 0  # 0-based step number
    finish_reason: str | None = None  # set on the last document only: length, eos, stop, error, cancelled, ...
    error: str | None = None  # with finish_reason='error' (or 'shutdown'): what went wrong, in words
    error_code: str | None = None  # with `error`: an ErrorCode value, for machines
    # Usage and timings, on the last document only.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_time_s: float | None = None
    time_to_first_token_s: float | None = None
    total_time_s: float | None = None


def error_document(message: str, code: ErrorCode) -> ModelOutputDocument:
    """The last (and here only) document of a stream that failed: no token, finish_reason='error'."""
    return ModelOutputDocument(
        token_id=-1, generated_text="", finish_reason="error", error=message, error_code=code.value
    )
