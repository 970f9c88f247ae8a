"""The service contract. Two-field clients of the seed tutorial keep working: every field beyond
`prompt`/`max_tokens` and `token_id`/`generated_text` is optional with a default."""

from __future__ import annotations

from typing import Optional

from docarray import BaseDoc

# The `error` of a request refused because the replica is full starts with this (finish_reason is 'error'),
# so transports can answer "retry later" (HTTP 429) instead of "bad request".
OVERLOADED_ERROR_PREFIX = "the service is overloaded"


class PromptDocument(BaseDoc):
    prompt: str
    max_tokens: int
    # Generation settings live here, not in Jina `parameters`: those never reach a streaming endpoint.
    chat_template: Optional[bool] = None  # None: the service default (apply the template when the tokenizer has one)
    stop: Optional[list[str]] = None  # text that ends generation; the stop text itself is never sent
    temperature: Optional[float] = None  # None or 0: greedy (the default)
    top_p: Optional[float] = None
    seed: Optional[int] = None


class ModelOutputDocument(BaseDoc):
    token_id: int
    generated_text: str  # all text so far
    text: str = ""  # what this step added to generated_text (may be empty while a character is incomplete)
    index: int = 0  # 0-based step number
    finish_reason: Optional[str] = None  # set on the last document only: length, eos, stop, error, cancelled, ...
    error: Optional[str] = None  # with finish_reason='error': what went wrong, in words
    # Usage and timings, on the last document only.
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    queue_time_s: Optional[float] = None
    time_to_first_token_s: Optional[float] = None
    total_time_s: Optional[float] = None


def error_document(message: str) -> ModelOutputDocument:
    """The last (and here only) document of a stream that failed: no token, finish_reason='error'."""
    return ModelOutputDocument(token_id=-1, generated_text="", finish_reason="error", error=message)
