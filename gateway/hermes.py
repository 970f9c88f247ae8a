"""Tool calls in the syntax of chat templates that have one of their own, the Hermes one (Hermes, Qwen2.5, Qwen3):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The executor's chat template renders the tools, an assistant's past calls and the tools' results itself (the
document's `tools`, and messages as they are); the gateway constrains the answer to calls in that syntax with a
grammar (the document's `grammar`, llguidance's Lark) and reads them back as they are generated (`HermesReader`).

- Under `required` or a named function the answer is one call or more (one without `parallel_tool_calls`), each
  of a function offered, its arguments its parameters. Under `auto`, text without the opening tag, which calls may
  follow (as these models write "Let me look that up." before a call); with a `response_format`, a JSON text of
  its schema or calls.
- A call's JSON is written as the template writes past calls (Python's `json.dumps`, `", "` and `": "` between
  tokens and no other whitespace): the model writes its calls as it saw them, and no whitespace runs on.
- Where a tag is a token of its own (Qwen's are), the grammar names it as one: the grammar library never reads an
  added token as its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.answer_schema import embedded
from gateway.json_stream import JsonStream, JsonStreamError, Path, Watch
from gateway.tools import AnswerReader, ToolFormat, merged, watch_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
SEPARATOR = "\n"  # after the opening tag, before the closing one, and between calls
# llguidance's JSON options: the separators of Python's json.dumps, which templates' `tojson` uses.
AS_TEMPLATES_WRITE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Text without the opening tag: what an answer under auto says before its calls, or instead of them.
TEXT = f"TEXT: /(?s:.+)/ & ~/(?s:.*){OPEN}(?s:.*)/"


@dataclass(frozen=True)
class HermesFormat(ToolFormat):
    """A request's tools in the Hermes syntax: for the template to render, and the grammar the answer follows."""

    tokens: tuple[str, ...] = ()  # the tags that are tokens of their own (ModelInfoDocument's tool_tokens)

    def document_fields(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"messages": messages, "tools": self.listed(), "grammar": self.grammar()}

    def reader(self) -> AnswerReader:
        return HermesReader()

    def grammar(self) -> str:
        """The answer's grammar, in llguidance's Lark: `body` is a call after its opening tag."""
        definitions: dict[str, Any] = {}
        calls = self.call_schemas(definitions)
        call = inline(calls[0] if len(calls) == 1 else {"anyOf": calls}, definitions)
        opening, closing, separator = self._tag(OPEN), self._tag(CLOSE), json.dumps(SEPARATOR)
        more = f"({separator} {opening} body)*" if self.parallel else ""
        rules = [f"body: {separator} %json {call} {separator} {closing}"]
        if self.choice.mode != "auto":
            rules.insert(0, f"start: {opening} body {more}")
        elif self.response is not None:
            response_definitions: dict[str, Any] = {}
            response = inline(embedded(self.response, "response", response_definitions), response_definitions)
            rules.insert(0, f"start: %json {response} | {opening} body {more}")
        elif OPEN in self.tokens:
            # A token ends the text before it: the text's terminal cannot hold it.
            rules[:0] = [f"start: TEXT? | TEXT? {opening} body {more}", TEXT]
        else:
            # The opening tag as text: one terminal of text and tag, or the text's terminal would run on into it.
            rules[:0] = [f"start: TEXT? | LEAD body {more}", TEXT, f"LEAD: TEXT? {opening}"]
        return "\n".join(["%llguidance {}", *rules])

    def _tag(self, tag: str) -> str:
        return tag if tag in self.tokens else json.dumps(tag)


def inline(schema: dict[str, Any], definitions: dict[str, Any]) -> str:
    """A schema as a grammar's `%json { ... }` takes it: with its definitions, written as templates write JSON."""
    whole = {**schema, **({"$defs": definitions} if definitions else {}), "x-guidance": AS_TEMPLATES_WRITE}
    return json.dumps(whole)


State = Literal["content", "open", "json", "close"]
NEXT = SEPARATOR + OPEN + SEPARATOR  # what begins the next call, after a whole one


@dataclass
class HermesReader(AnswerReader):
    """An answer in the Hermes syntax: content up to the first call (text that may be the start of the opening tag
    held back until it is not), then the calls, each call's JSON read as the generic format's is."""

    state: State = "content"
    pending: str = ""  # content held back (it may begin the opening tag), or the literal of the syntax expected
    stream: JsonStream | None = None  # the JSON of the call being read
    index: int = 0  # the call being read
    deltas: list[dict[str, Any]] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """After a whole call, before anything of the next one."""
        return self.state == "open" and self.pending == NEXT and not self.lost

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        content, self.deltas = "", []
        for position, character in enumerate(text):
            if self.lost:
                content += self._content(text[position:])
                break
            content += self._character(character)
        return content, merged(self.deltas)

    def finish(self) -> str:
        """Held-back content is content once the answer ends without the tag it might have begun."""
        if self.state != "content":
            return ""
        held, self.pending = self.pending, ""
        return self._content(held)

    def _character(self, character: str) -> str:
        """The content `character` adds."""
        if self.state == "content":
            self.pending += character
            if self.pending == OPEN:
                self.state, self.pending = "open", SEPARATOR
                return ""
            shown = ""
            while self.pending and not OPEN.startswith(self.pending):
                shown, self.pending = shown + self.pending[0], self.pending[1:]
            return self._content(shown)
        if self.state == "json":
            return self._json(character)
        if not self.pending.startswith(character):  # not the syntax's literal
            self.lost = True
            return self._content(character)
        self.pending = self.pending[1:]
        if not self.pending and self.state == "open":
            self.state, self.index, self.stream = "json", len(self.calls), JsonStream(watch)
        elif not self.pending:
            self.state, self.pending = "open", NEXT
        return ""

    def _json(self, character: str) -> str:
        assert self.stream is not None
        try:
            pieces = self.stream.feed(character)
        except JsonStreamError:
            self.lost = True
            return self._content(character)
        for piece in pieces:
            self._call_piece(self.index, piece, self.deltas)
        if self.stream.done:
            self.state, self.pending = "close", SEPARATOR + CLOSE
        return ""


def watch(path: Path, first: str) -> Watch | None:
    """A call's name and arguments, the keys of its JSON object."""
    return watch_call(path[0], first) if len(path) == 1 else None
