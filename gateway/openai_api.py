"""OpenAI-compatible requests and responses, translated to and from the service's documents.

Pure translation: request JSON -> PromptDocument fields, ModelOutputDocuments -> chunks and responses. No model
logic lives here (no tokenizer, no chat template): the executor applies the template and checks the context, the
engine holds an answer to its `json_schema`. Tools become prompt text and a schema in gateway/tools.py, or,
where the model's chat template has a tool syntax of its own (the executor says so), the template's tools and a
grammar of that syntax in gateway/hermes.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    Extra,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    validator,
)

from gateway.answer_schema import closed
from gateway.hermes import HermesFormat
from gateway.tools import (
    AnswerReader,
    GenericFormat,
    Tool,
    ToolCall,
    ToolFormat,
    calls_text,
    tool_choice,
    tool_response_text,
    unique_names,
    valid_name,
)
from schemas import ErrorCode, ModelInfoDocument, ModelOutputDocument, ToolSyntax

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
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions' `logprobs` takes as many here (OpenAI: 5)
# OpenAI's "developer" role is its newer name for the system prompt (reasoning models, recent SDKs).
ROLE_ALIASES = {"developer": "system"}


class ContentPart(BaseModel):
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: StrictStr | None = None  # a tool's result: the call it answers

    @validator("tool_calls")
    def _calls_are_the_assistants(cls, value, values):
        if value and values.get("role") != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {values.get('role')!r} ones")
        return value

    @validator("tool_call_id", always=True)
    def _tool_results_name_their_call(cls, value, values):
        if values.get("role") == "tool" and value is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def document_message(self, call_names: Mapping[str, str]) -> dict[str, str]:
        """The message in a role every chat template takes: tool results and calls as the generic format writes
        them (gateway/tools.py). `call_names`: each earlier call's function, by id (a tool result names it)."""
        if self.role == "tool" and self.tool_call_id is not None:
            name = call_names.get(self.tool_call_id, self.name)
            return {"role": "user", "content": tool_response_text(self.text(), name, self.tool_call_id)}
        if self.tool_calls:
            return {"role": "assistant", "content": calls_text(self.tool_calls, self.text())}
        return {"role": ROLE_ALIASES.get(self.role, self.role), "content": self.text()}

    def native_message(self) -> dict[str, Any]:
        """The message for a chat template with a tool syntax of its own: its calls and a tool's result as they
        are, for the template to write (PromptDocument's ChatMessage)."""
        message: dict[str, Any] = {"role": ROLE_ALIASES.get(self.role, self.role), "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"call_id": call.id, "name": call.function.name,
                                      "arguments": call.function.arguments} for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


class JsonSchemaFormat(BaseModel):
    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` is a method of pydantic's models
    strict: StrictBool | None = None  # the answer follows the schema either way: it is constrained to it

    @validator("name")
    def _name(cls, value):
        return valid_name(value, "the schema name")


FORMATS = ("text", "json_object", "json_schema")
ANY_OBJECT = {"type": "object"}


class ResponseFormat(BaseModel):
    type: StrictStr
    json_schema: JsonSchemaFormat | None = None

    @validator("type")
    def _known(cls, value):
        if value not in FORMATS:
            raise ValueError(f"response_format type must be one of {', '.join(FORMATS)}, got {value!r}")
        return value

    @validator("json_schema", always=True)
    def _schema_for_json_schema(cls, value, values):
        if values.get("type") == "json_schema" and value is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return value

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the answer is held to; None for text."""
        if self.type == "json_schema" and self.json_schema is not None:
            return closed(self.json_schema.schema_) if self.json_schema.schema_ else ANY_OBJECT
        return ANY_OBJECT if self.type == "json_object" else None


def in_range(name: str, low: float, high: float):
    """A validator that refuses a value outside OpenAI's [low, high], naming the field and the range."""

    def check(cls, value):
        if value is not None and not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return validator(name, allow_reuse=True)(check)


def unsupported(name: str, reason: str, allowed=lambda value: value is None):
    """A validator that refuses a field this service does not implement, saying so (rather than ignoring it)."""

    def check(cls, value):
        if not allowed(value):
            raise ValueError(f"{name} is not supported by this service: {reason}")
        return value

    return validator(name, allow_reuse=True, pre=True)(check)


class CommonRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions. Unknown fields are ignored, as OpenAI-compatible
    servers commonly do (SDKs send fields such as `user`); those that would change the answer are refused."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None  # an extension (vLLM's and TGI's): CTRL's penalty, > 0, 1 is none
    logit_bias: dict[StrictStr, Number] | None = None  # token id (a JSON key, so text) -> -100..100
    response_format: ResponseFormat | None = None

    class Config:
        extra = Extra.ignore

    _temperature = in_range("temperature", 0, 2)
    _top_p = in_range("top_p", 0, 1)
    _presence_penalty = in_range("presence_penalty", -2, 2)
    _frequency_penalty = in_range("frequency_penalty", -2, 2)
    _n = unsupported("n", "one choice per request; send n requests", lambda value: value in (None, 1))

    @validator("max_tokens")
    def _positive_max_tokens(cls, value):
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1, got {value}")
        return value

    @validator("repetition_penalty")
    def _positive_repetition_penalty(cls, value):
        if value is not None and not value > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {value}")
        return value

    @validator("logit_bias")
    def _token_ids_and_biases(cls, value):
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for token {key} must be between -100 and 100, got {bias}")
        return value

    @validator("stop")
    def _stop_list(cls, value):
        if isinstance(value, str):
            return [value]
        return value

    def document_fields(self, info: ModelInfoDocument) -> dict[str, Any]:
        """The PromptDocument's fields, for the model `info` describes."""
        fields = {
            "max_tokens": self.max_tokens or DEFAULT_MAX_TOKENS,
            "stop": self.stop or None,
            "temperature": as_float(self.temperature),
            "top_p": as_float(self.top_p),
            "seed": self.seed,
            "presence_penalty": as_float(self.presence_penalty),
            "frequency_penalty": as_float(self.frequency_penalty),
            "repetition_penalty": as_float(self.repetition_penalty),
            "logit_bias": None if not self.logit_bias else {key: float(v) for key, v in self.logit_bias.items()},
            "json_schema": self.response_format and self.response_format.answer_schema(),
        }
        return {key: value for key, value in fields.items() if value is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def schema_source(self) -> str | None:
        """The field the document's constraint (`json_schema` or `grammar`) comes from; None when it has none."""
        return "response_format" if self.response_format and self.response_format.answer_schema() else None

    def named(self, refusal: OpenAIError) -> OpenAIError:
        """A refusal as this request's client knows its fields: the engine names `json_schema` or `grammar`,
        which the client did not send, so the field it came from leads the message (a schema that does not
        compile, or is too large or too deep, for the engine's limits)."""
        source = self.schema_source
        if source is None or not any(name in refusal.message for name in ("json_schema", "grammar")):
            return refusal
        return OpenAIError(refusal.status, f"{source}: {refusal.message}", refusal.type, source, refusal.code)

    @property
    def wants_logprobs(self) -> bool:
        return False


def as_float(value: float | None) -> float | None:
    return None if value is None else float(value)


class ChatRequest(CommonRequest):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None  # a gateway.tools.ToolChoice once validated (after tools: its validator reads them)
    parallel_tool_calls: StrictBool | None = None
    # OpenAI's deprecated form of tools: refused, naming the current one (declared so as not to be ignored).
    functions: Any = None
    function_call: Any = None

    _top_logprobs = in_range("top_logprobs", 0, MAX_TOP_LOGPROBS)
    _functions = unsupported("functions", "send tools (functions is their deprecated form)")
    _function_call = unsupported("function_call", "send tool_choice (function_call is its deprecated form)",
                                 lambda value: value in (None, "none"))

    @validator("tools")
    def _named_functions(cls, value):
        return None if value is None else unique_names(value)

    @validator("tool_choice", pre=True, always=True)
    def _choice_among_tools(cls, value, values):
        if "tools" not in values:  # the tools were refused: their error says why
            return None
        return tool_choice(value, values["tools"])

    @validator("parallel_tool_calls")
    def _parallel_needs_tools(cls, value, values):
        if value is not None and "tools" in values and not values["tools"]:
            raise ValueError("parallel_tool_calls needs tools: send the functions it may call")
        return value

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

    @validator("top_logprobs")
    def _top_logprobs_need_logprobs(cls, value, values):
        if value and not values.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    def document_fields(self, info: ModelInfoDocument) -> dict[str, Any]:
        fields = super().document_fields(info)
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        # The whole conversation: the executor applies the model's chat template turn by turn, past calls and
        # tools' results in the template's own syntax where it has one.
        if native_tools(info):
            messages = [message.native_message() for message in self.messages]
        else:
            names = {call.id: call.function.name for message in self.messages for call in message.tool_calls or []}
            messages = [message.document_message(names) for message in self.messages]
        tools = self.tool_format(info)
        fields.update(messages=messages, chat_template=True)
        fields.update(tools.document_fields(messages) if tools else {})
        if self.logprobs:
            fields.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        return fields

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def schema_source(self) -> str | None:
        return "tools" if self.may_call else super().schema_source

    @property
    def may_call(self) -> bool:
        """The answer may call tools: there are some, and tool_choice is not none."""
        return bool(self.tools) and self.tool_choice is not None and self.tool_choice.mode != "none"

    def tool_format(self, info: ModelInfoDocument) -> ToolFormat | None:
        """How the answer may call the tools, in the syntax of the model `info` describes; None when it may not
        (no tools, or tool_choice none)."""
        if not self.may_call or not self.tools:
            return None
        response = self.response_format.answer_schema() if self.response_format else None
        parallel = self.parallel_tool_calls is not False
        if native_tools(info):
            return HermesFormat(self.tools, self.tool_choice, parallel, response, tuple(info.tool_tokens or ()))
        return GenericFormat(self.tools, self.tool_choice, parallel, response)


def native_tools(info: ModelInfoDocument) -> bool:
    """The model's chat template has a tool syntax the gateway writes grammars for and reads calls of."""
    return info.tool_format == ToolSyntax.HERMES.value


class CompletionRequest(CommonRequest):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = None  # completions: how many alternatives per token (0: the chosen token's only)
    echo: StrictBool | None = None  # after logprobs: its validator reads it
    best_of: Any = None  # refused beyond 1 (below)
    suffix: Any = None  # refused

    _logprobs = in_range("logprobs", 0, MAX_TOP_LOGPROBS)
    _best_of = unsupported("best_of", "one choice per request", lambda value: value in (None, 1))
    _suffix = unsupported("suffix", "the model does not insert text")

    @validator("prompt")
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send exactly one prompt")
            return value[0]
        return value

    @validator("echo")
    def _echo_without_logprobs(cls, value, values):
        if value and values.get("logprobs") is not None:
            raise ValueError("echo with logprobs is not supported: the engine does not score prompt tokens")
        return value

    def document_fields(self, info: ModelInfoDocument) -> dict[str, Any]:
        fields = {**super().document_fields(info), "prompt": self.prompt, "chat_template": False}
        if self.logprobs is not None:
            fields.update(logprobs=True, top_logprobs=self.logprobs)
        return fields

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def echoed(self) -> str:
        """The text put before the answer: the prompt with `echo`."""
        return str(self.prompt) if self.echo else ""


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
    """OpenAI's usage, with the prompt tokens the prefix cache served (`prompt_tokens_details.cached_tokens`)."""
    prompt, completion = doc.prompt_tokens or 0, doc.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": doc.cached_tokens or 0},
    }


def chat_logprobs(docs: list[ModelOutputDocument]) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]} for these tokens."""
    return {"content": [{**token_entry(doc.token or "", doc.logprob), "top_logprobs": [
        token_entry(text, logprob) for text, logprob in alternatives(doc)]} for doc in docs], "refusal": None}


def token_entry(token: str, logprob: float | None) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


def alternatives(doc: ModelOutputDocument) -> list[tuple[str, float]]:
    """The document's top alternatives as (text, logprob), most likely first."""
    if doc.top_logprobs is None or not doc.top_tokens:
        return []
    return list(zip(doc.top_tokens, map(float, doc.top_logprobs)))


def completion_logprobs(docs: list[ModelOutputDocument], offset: int) -> dict:
    """OpenAI's completions `logprobs`: parallel lists, `text_offset` the token's place in the choice's text
    (`offset`: what comes before the answer, the echoed prompt)."""
    return {
        "tokens": [doc.token or "" for doc in docs],
        "token_logprobs": [doc.logprob for doc in docs],
        "top_logprobs": [dict(alternatives(doc)) for doc in docs],
        "text_offset": [offset + len(doc.generated_text) - len(doc.text) for doc in docs],
    }


def scored(docs: list[ModelOutputDocument]) -> list[ModelOutputDocument]:
    """The documents whose token is part of the answer: the end-of-sequence token, which OpenAI never shows, and
    documents without a token (an error, a cancellation) have no logprobs entry."""
    return [doc for doc in docs if doc.logprob is not None and doc.finish_reason != "eos"]


class ResponseBuilder:
    """Builds the chunks and the whole response of one request (chat or text completion)."""

    def __init__(self, request: CommonRequest, info: ModelInfoDocument) -> None:
        self.chat = isinstance(request, ChatRequest)
        self.logprobs = request.wants_logprobs
        self.echoed = request.echoed if isinstance(request, CompletionRequest) else ""
        self.tools = request.tool_format(info) if isinstance(request, ChatRequest) else None
        self.reader = self.tools.reader() if self.tools else None  # the stream's answer, when tools may be called
        self.model = info.model
        self.fingerprint = info.fingerprint
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object_suffix: str, choices: list[dict]) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + object_suffix, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def first_chunk(self) -> dict | None:
        """What a stream starts with: chat's role, or the echoed prompt of a completion."""
        if self.chat:
            choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}
            return self._envelope(".chunk", [choice])
        if self.echoed:
            return self._envelope("", [{"index": 0, "text": self.echoed, "logprobs": None, "finish_reason": None}])
        return None

    def _logprobs(self, docs: list[ModelOutputDocument], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        return chat_logprobs(scored(docs)) if self.chat else completion_logprobs(scored(docs), offset)

    def chunk(self, doc: ModelOutputDocument) -> dict | None:
        """The chunk for one document, or None when it adds nothing (no text, no logprobs and not the last)."""
        reason = finish_reason(doc)
        logprobs = self._logprobs([doc], len(self.echoed)) if scored([doc]) else None
        if not self.chat:
            if not doc.text and reason is None and logprobs is None:
                return None
            return self._envelope("", [{"index": 0, "text": doc.text, "logprobs": logprobs, "finish_reason": reason}])
        delta: dict[str, Any] = {"content": doc.text} if doc.text else {}
        if self.reader is not None:
            content, calls = self.reader.feed(doc.text)
            content += self.reader.finish() if reason is not None else ""
            delta = {**({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}
            reason = tools_finish_reason(reason, self.reader)
        if not delta and reason is None and logprobs is None:
            return None
        return self._envelope(".chunk", [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])

    def usage_chunk(self, doc: ModelOutputDocument) -> dict:
        return {**self._envelope(".chunk" if self.chat else "", []), "usage": usage(doc)}

    def response(self, docs: list[ModelOutputDocument]) -> dict:
        """The whole answer from every document of the stream (the last one carries the text and the usage)."""
        last = docs[-1]
        logprobs = self._logprobs(docs, len(self.echoed))
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": last.generated_text}
            reason = finish_reason(last)
            if self.tools is not None:
                answer = self.tools.reader()
                answer.feed(last.generated_text)
                answer.finish()
                # OpenAI's null beside calls; a template's syntax may have text before them.
                message["content"] = (answer.content or None) if answer.calls else answer.content
                if answer.calls:
                    message["tool_calls"] = answer.calls
                reason = tools_finish_reason(reason, answer)
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": self.echoed + last.generated_text, "logprobs": logprobs,
                      "finish_reason": finish_reason(last)}
        return {**self._envelope("", [choice]), "usage": usage(last)}


def tools_finish_reason(reason: str | None, answer: AnswerReader) -> str | None:
    """OpenAI's `tool_calls` for an answer that ended (not cut) on whole calls."""
    return "tool_calls" if reason == "stop" and answer.calls and answer.whole else reason


def model_card(info: ModelInfoDocument) -> dict:
    """OpenAI's model object, plus the context length (prompt + max_tokens) as vLLM names it."""
    return {"id": info.model, "object": "model", "created": 0, "owned_by": "jina", "max_model_len": info.max_model_len}


def models_list(info: ModelInfoDocument) -> dict:
    return {"object": "list", "data": [model_card(info)]}
