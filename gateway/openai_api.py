"""OpenAI-compatible requests and responses, translated to and from the service's documents.

Pure translation: request JSON -> PromptDocument fields, ModelOutputDocuments -> chunks and responses. No model
logic lives here (no tokenizer, no chat template): the executor applies the template and checks the context.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, Extra, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, validator

from schemas import ErrorCode, ModelOutputDocument

DEFAULT_MAX_TOKENS = 256  # OpenAI's default is "the rest of the context"; the gateway does not know the context

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context_length": "length"}


class OpenAIError(Exception):
    """An error answered as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Number = StrictInt | StrictFloat


class ContentPart(BaseModel):
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


class CommonRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions. Unknown fields are ignored, as OpenAI-compatible
    servers commonly do (SDKs send fields such as `user` or `logit_bias`)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None

    class Config:
        extra = Extra.ignore

    @validator("max_tokens")
    def _positive_max_tokens(cls, value):
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1, got {value}")
        return value

    @validator("n")
    def _single_choice(cls, value):
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    @validator("stop")
    def _stop_list(cls, value):
        if isinstance(value, str):
            return [value]
        return value

    def document_fields(self) -> dict[str, Any]:
        fields = {
            "max_tokens": self.max_tokens or DEFAULT_MAX_TOKENS,
            "stop": self.stop or None,
            "temperature": None if self.temperature is None else float(self.temperature),
            "top_p": None if self.top_p is None else float(self.top_p),
            "seed": self.seed,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(CommonRequest):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None

    @validator("messages")
    def _some_messages(cls, value):
        if not value:
            raise ValueError("messages must contain at least one message")
        return value

    @validator("max_completion_tokens")
    def _positive_max_completion_tokens(cls, value):
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be at least 1, got {value}")
        return value

    def document_fields(self) -> dict[str, Any]:
        fields = super().document_fields()
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        if len(self.messages) == 1 and self.messages[0].role == "user":
            # The executor renders a single user message with the tokenizer's chat template.
            fields.update(prompt=self.messages[0].text(), chat_template=True)
        else:
            # Several turns: a plain transcript, sent as one user message, until PromptDocument has `messages`.
            lines = [f"{message.role}: {message.text()}" for message in self.messages]
            fields.update(prompt="\n".join(lines), chat_template=True)
        return fields


class CompletionRequest(CommonRequest):
    prompt: StrictStr | list[StrictStr]

    @validator("prompt")
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send exactly one prompt")
            return value[0]
        return value

    def document_fields(self) -> dict[str, Any]:
        return {**super().document_fields(), "prompt": self.prompt, "chat_template": False}


def parse_request(model: type[CommonRequest], body: Any) -> CommonRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.parse_obj(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "__root__") or None
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return_code = "missing_required_parameter" if first["type"] == "value_error.missing" else "invalid_value"
        raise OpenAIError(400, message, param=param.split(".")[0] if param else None, code=return_code) from None


# Each ErrorCode as an HTTP status and OpenAI's error type; the OpenAI error's `code` is the ErrorCode itself.
STATUSES = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.SHUTDOWN: (503, "server_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


def failure(doc: ModelOutputDocument) -> OpenAIError | None:
    """The OpenAI error for a document that ends a stream in failure, or None."""
    if doc.finish_reason == "cancelled":
        return OpenAIError(500, doc.error or "the generation was cancelled", type="server_error", code="cancelled")
    if doc.finish_reason not in ("error", "shutdown"):
        return None
    code = error_code(doc)
    status, kind = STATUSES[code]
    return OpenAIError(status, doc.error or f"the request failed ({code.value})", type=kind, code=code.value)


def error_code(doc: ModelOutputDocument) -> ErrorCode:
    """The document's ErrorCode. Every failure the service sends carries one; without a code this gateway knows
    (an executor of another version: Kubernetes may update the two apart) a shutdown is still a shutdown, and
    anything else counts as the service's own fault."""
    try:
        return ErrorCode(doc.error_code)
    except ValueError:
        return ErrorCode.SHUTDOWN if doc.finish_reason == "shutdown" else ErrorCode.INTERNAL


def finish_reason(doc: ModelOutputDocument) -> str | None:
    if doc.finish_reason is None:
        return None
    return FINISH_REASONS.get(doc.finish_reason, doc.finish_reason)


def usage(doc: ModelOutputDocument) -> dict:
    prompt, completion = doc.prompt_tokens or 0, doc.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseBuilder:
    """Builds the chunks and the whole response of one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object_suffix: str, choices: list[dict]) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + object_suffix, "created": self.created, "model": self.model,
                "choices": choices}

    def role_chunk(self) -> dict | None:
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope(".chunk", [choice])

    def chunk(self, doc: ModelOutputDocument) -> dict | None:
        """The chunk for one document, or None when it adds nothing (no text and not the last)."""
        reason = finish_reason(doc)
        if not doc.text and reason is None:
            return None
        if self.chat:
            choice = {"index": 0, "delta": {"content": doc.text} if doc.text else {}, "logprobs": None,
                      "finish_reason": reason}
            return self._envelope(".chunk", [choice])
        choice = {"index": 0, "text": doc.text, "logprobs": None, "finish_reason": reason}
        return self._envelope("", [choice])

    def usage_chunk(self, doc: ModelOutputDocument) -> dict:
        return {**self._envelope(".chunk" if self.chat else "", []), "usage": usage(doc)}

    def response(self, last: ModelOutputDocument) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": last.generated_text},
                      "logprobs": None, "finish_reason": finish_reason(last)}
        else:
            choice = {"index": 0, "text": last.generated_text, "logprobs": None, "finish_reason": finish_reason(last)}
        return {**self._envelope("", [choice]), "usage": usage(last)}


def models_list(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "jina"}]}
