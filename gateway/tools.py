"""Tool calls: OpenAI's tools and tool_choice, what every format shares (`ToolFormat`, `AnswerReader`), and the
format for a chat template without tool syntax, llama.cpp's generic one (common/chat.cpp, and minja's polyfills of
tools, tool calls and tool responses). A template's own syntax is gateway/hermes.py's.

In the generic format, the tools go into the system prompt as JSON, with the shape of the answer. The answer is
constrained (the document's `json_schema`) to one JSON object: `{"tool_call": {"name", "arguments"}}`,
`{"tool_calls": [...]}` when calls may be parallel, or, under `auto`, `{"response": "..."}` instead. Each call's
schema is its function's: the name a constant, the arguments its parameters. Past calls and tool results in the
history become text in the roles every template takes (assistant, user). `GenericReader` turns the answer back
into OpenAI's content and tool calls as it is generated.

Departures from llama.cpp's format, each for a reason: the answer's own objects say that they take no other
properties, so that a reader knows where each value is (llama.cpp's grammar reads them so without being told);
parallel calls carry no id of the model's making (the gateway gives every call its own, as OpenAI does); a
parameters schema with references moves under the answer schema's `$defs`, where its references still point
(llama.cpp inlines it, which breaks them).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, StrictBool, StrictStr, validator

from gateway.answer_schema import closed, embedded
from gateway.json_stream import JsonStream, JsonStreamError, Path, Piece, Watch
from schemas import json_or_text

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function and schema names
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def valid_name(value: str, what: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1 to 64 letters, digits, underscores or dashes")
    return value


class FunctionDefinition(BaseModel):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object; none: the function takes no arguments
    strict: StrictBool | None = None  # the arguments follow the schema either way: they are constrained to it

    @validator("name")
    def _name(cls, value):
        return valid_name(value, "the function name")

    @validator("parameters")
    def _object_schema(cls, value, values):
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(f"the parameters of function {values.get('name')!r} must be a JSON Schema of "
                             f"type object, got type {json.dumps(value['type'])}")
        return value

    def arguments_schema(self) -> dict[str, Any]:
        if self.parameters is None:
            return NO_ARGUMENTS
        return closed({"type": "object", **self.parameters})  # "type" defaults to object: arguments are one


class Tool(BaseModel):
    type: StrictStr
    function: FunctionDefinition

    @validator("type")
    def _function(cls, value):
        if value != "function":
            raise ValueError(f"tool type must be 'function' (the only kind served), got {value!r}")
        return value


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call in an assistant message of the history."""

    id: StrictStr
    type: StrictStr = "function"
    function: FunctionCall


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None  # the function `mode="function"` names


CHOICES = {mode: ToolChoice(mode) for mode in ("none", "auto", "required")}


def tool_choice(value: Any, tools: list[Tool] | None) -> ToolChoice:
    """OpenAI's `tool_choice` (None: its default, auto with tools and none without), checked against `tools`."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str) and value in CHOICES:
        choice = CHOICES[value]
    elif isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str):
        choice = ToolChoice("function", value["function"]["name"])
    else:
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         f'{{"name": ...}}}}, got {json.dumps(value)}')
    if choice.mode == "none":
        return choice
    if not tools:
        raise ValueError(f"tool_choice {json.dumps(value)} needs tools: send the functions it may call")
    names = [tool.function.name for tool in tools]
    if choice.name is not None and choice.name not in names:
        raise ValueError(f"tool_choice names function {choice.name!r}, which is not among the tools "
                         f"({', '.join(names)})")
    return choice


def unique_names(tools: list[Tool]) -> list[Tool]:
    if not tools:
        raise ValueError("tools must hold at least one function (leave tools out for none)")
    names = [tool.function.name for tool in tools]
    if duplicated := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"each function needs its own name: {', '.join(duplicated)} appears more than once")
    return tools


@dataclass(frozen=True)
class ToolFormat:
    """What one request may call, whatever the syntax its calls are written in (the generic format's below, or a
    chat template's own, gateway/hermes.py)."""

    tools: list[Tool]
    choice: ToolChoice  # auto, required or a function
    parallel: bool  # several calls in one answer (OpenAI's parallel_tool_calls, true by default)
    response: dict[str, Any] | None = None  # response_format's schema: what a text answer holds under auto

    def listed(self) -> list[dict[str, Any]]:
        """The tools as OpenAI's JSON, as a prompt shows them (`strict` is the service's business, not the
        model's)."""
        return [tool.dict(exclude_none=True, exclude={"function": {"strict"}}) for tool in self.tools]

    def call_schemas(self, definitions: dict[str, Any]) -> list[dict[str, Any]]:
        """The schema of a call of each function the answer may call: its name a constant, its arguments its
        parameters (their references moved into `definitions`)."""
        callable_tools = [tool for tool in self.tools if self.choice.name in (None, tool.function.name)]
        return [{
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": tool.function.name},
                "arguments": embedded(tool.function.arguments_schema(), f"tool-{tool.function.name}", definitions),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        } for tool in callable_tools]

    def document_fields(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The document's fields for `messages` with these tools: the prompt, and the constraint of the answer."""
        raise NotImplementedError

    def reader(self) -> AnswerReader:
        """A reader of one answer in this format."""
        raise NotImplementedError


@dataclass(frozen=True)
class GenericFormat(ToolFormat):
    """llama.cpp's generic format: what the system prompt says and what the answer is constrained to."""

    @property
    def key(self) -> str:
        return "tool_calls" if self.parallel else "tool_call"

    def document_fields(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"messages": with_system(messages, self.system_prompt()), "json_schema": self.schema()}

    def reader(self) -> AnswerReader:
        return GenericReader()

    def system_prompt(self) -> str:
        """What the system message says: the answer's shape, and the tools as minja's polyfill lists them, with an
        example of a call. Under auto, an example of a response too (llama.cpp shows a call only): without it, the
        embedded model answered even "Write a haiku" with a call."""
        auto = self.choice.mode == "auto"
        example = {"name": "tool_name", "arguments": {"arg1": "some_value"}}
        examples: list[tuple[str, Any]] = [("tool call", {self.key: [example] if self.parallel else example})]
        if auto:
            examples.append(("response", {"response": "..."}))
        answer = (f"either with `{self.key}` (a request to call tools) or with `response` reply to the user's "
                  "request") if auto else f"with `{self.key}` (a request to call tools)"
        tools = json.dumps(self.listed(), indent=2, ensure_ascii=False)
        shown = "".join(f"\n\nExample {what} syntax:\n\n{json.dumps(shape, indent=2)}" for what, shape in examples)
        return (f"Respond in JSON format, {answer}\n\nYou can call any of the following tools to satisfy the user's "
                f"requests: {tools}{shown}")

    def schema(self) -> dict[str, Any]:
        """The answer's JSON Schema."""
        definitions: dict[str, Any] = {}
        calls = self.call_schemas(definitions)
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        value = {"type": "array", "items": call, "minItems": 1} if self.parallel else call
        schema = answer_object(self.key, value)
        if self.choice.mode == "auto":
            response = embedded(self.response or {"type": "string"}, "response", definitions)
            schema = {"anyOf": [schema, answer_object("response", response)]}
        return {**schema, "$defs": definitions} if definitions else schema


def answer_object(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


def with_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """`text` at the end of the system prompt, or as one (minja's add_system)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_text(calls: list[ToolCall], content: str) -> str:
    """An assistant message's calls as the generic format writes them (minja's polyfill of tool calls)."""
    rendered: dict[str, Any] = {"tool_calls": [
        {"name": call.function.name, "arguments": json_or_text(call.function.arguments), "id": call.id}
        for call in calls]}
    if content:
        rendered["content"] = content
    return json.dumps(rendered, indent=2, ensure_ascii=False)


def tool_response_text(content: str, name: str | None, call_id: str) -> str:
    """A tool's result as the generic format writes it, in a user message (minja's polyfill of tool responses)."""
    response = {**({"tool": name} if name else {}), "content": content, "tool_call_id": call_id}
    return json.dumps({"tool_response": response}, indent=2, ensure_ascii=False)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class AnswerReader:
    """One answer with tools, read as it is generated: its content, and each call as OpenAI streams it (its id,
    type and name first, then its arguments' JSON text in pieces). Text that does not read as the format (a model
    not held to it) is content, as it came."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool_calls, arguments as they stand
    lost: bool = False  # the text stopped reading as the format: the rest is content
    name: str = ""  # the name of the call being read

    @property
    def whole(self) -> bool:
        """The answer is whole in the format (not cut by max_tokens or a stop string)."""
        raise NotImplementedError

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """What `text` adds: content, and tool call deltas (one per call it touches, OpenAI's chunk entries)."""
        raise NotImplementedError

    def finish(self) -> str:
        """The content held back until the answer ended, if the format holds any."""
        return ""

    def _content(self, text: str) -> str:
        self.content += text
        return text

    def _call_piece(self, index: int, piece: Piece, deltas: list[dict[str, Any]]) -> None:
        """The call delta a piece of call `index` adds to `deltas`: its name (the call's first delta, once whole)
        or a piece of its arguments."""
        if piece.path[-1] == "name":
            self.name += piece.text
            if piece.kind == "end":
                call = {"id": call_id(), "type": "function", "function": {"name": self.name, "arguments": ""}}
                self.calls.append(call)
                self.name = ""
                deltas.append({"index": index, **copy.deepcopy(call)})
        elif piece.kind == "raw":
            self.calls[index]["function"]["arguments"] += piece.text
            deltas.append({"index": index, "function": {"arguments": piece.text}})


def watch_call(part: str | int, first: str) -> Watch | None:
    """What a reader watches of a call's JSON: the name's text, the arguments' JSON text."""
    if part == "name" and first == '"':
        return "text"
    return "raw" if part == "arguments" else None


@dataclass
class GenericReader(AnswerReader):
    """An answer in the generic format: the response's text as it arrives (unescaped), and the calls."""

    read: str = ""  # every text fed

    def __post_init__(self) -> None:
        self.stream = JsonStream(self._watch)

    @property
    def whole(self) -> bool:
        return self.stream.done and not self.lost

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.read += text
        if self.lost:
            return self._content(text), []
        try:
            pieces = self.stream.feed(text)
        except JsonStreamError:
            self.lost = True
            # Nothing shown yet: all of it is content. Else what came before stays as it was shown.
            return self._content(self.read if not self.content and not self.calls else text), []
        deltas: list[dict[str, Any]] = []
        content = "".join(self._piece(piece, deltas) for piece in pieces)
        self.content += content
        return content, merged(deltas)

    def _watch(self, path: Path, first: str) -> Watch | None:
        if path == ("response",):
            return "text" if first == '"' else "raw"
        if call_index(path[:-1]) is not None:
            return watch_call(path[-1], first)
        return None

    def _piece(self, piece: Piece, deltas: list[dict[str, Any]]) -> str:
        """The content `piece` adds (the response's), or the call delta it adds to `deltas`."""
        if piece.path == ("response",):
            return piece.text
        index = call_index(piece.path[:-1])
        assert index is not None  # only the response and calls' parts are watched
        self._call_piece(index, piece, deltas)
        return ""


def call_index(path: Path) -> int | None:
    """Which call a path is inside of: `("tool_call",)` is the one call, `("tool_calls", i)` the i-th."""
    if path == ("tool_call",):
        return 0
    if len(path) == 2 and path[0] == "tool_calls" and isinstance(path[1], int):
        return path[1]
    return None


def merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per call: a call's name and its first arguments can come in one token."""
    entries: list[dict[str, Any]] = []
    for delta in deltas:
        if entries and entries[-1]["index"] == delta["index"]:
            entries[-1]["function"]["arguments"] += delta["function"]["arguments"]
        else:
            entries.append(delta)
    return entries
