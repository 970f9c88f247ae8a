"""Reading a JSON text as it is generated: the values a reader watches, piece by piece, before the text is whole.

A tool call's `arguments` must be streamed while the model writes them, and an answer's `response` text as it
arrives, unescaped: a whole-text parser sees nothing until the end. `JsonStream` reads one character at a time and
reports the pieces of the values it was asked to watch, each by its path (`("tool_calls", 0, "arguments")`): a
watched value's own JSON text, compact ("raw"), or a watched string's decoded characters ("text").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Path = tuple[str | int, ...]
Watch = Literal["raw", "text"]
WHITESPACE = " \t\n\r"
LITERAL_START = "-0123456789tfn"
CLOSERS = {"{": "}", "[": "]"}
SIMPLE_ESCAPE_LENGTH, UNICODE_ESCAPE_LENGTH = 2, 6  # `\n`; `\u00e9`


class JsonStreamError(ValueError):
    """The text is not JSON (or more than one value)."""


@dataclass
class Piece:
    path: Path
    kind: Literal["raw", "text", "end"]  # "end": the watched value is whole
    text: str = ""


@dataclass
class _Frame:
    opener: str  # "{" or "["
    key: str | int | None  # an object's current key, an array's current index


@dataclass
class _Watched:
    path: Path
    kind: Watch
    depth: int  # how many containers enclose the value: it ends when the stack is back to this depth
    ended: bool = False


class JsonStream:
    """One JSON value's text, fed as it arrives. `watch(path, first_character)` says, for each value as it starts,
    whether to report it ("raw" or "text", the latter for strings) or not (None); values inside a watched one are
    part of it and not asked about."""

    def __init__(self, watch: Callable[[Path, str], Watch | None]) -> None:
        self.watch = watch
        self.stack: list[_Frame] = []
        self.expect = "value"  # value | value_or_close | key | key_or_close | colon | comma_or_close | done
        self.string: Literal["key", "value"] | None = None  # inside a string, and whose
        self.escape = ""  # an escape sequence begun in a string (`\u00`)
        self.surrogate = ""  # a decoded high surrogate waiting for its low half
        self.key = ""
        self.literal = False  # inside a number, true, false or null
        self.watched: _Watched | None = None
        self.pieces: list[Piece] = []

    @property
    def done(self) -> bool:
        """The value is whole."""
        return self.expect == "done"

    def feed(self, text: str) -> list[Piece]:
        """The pieces `text` adds, consecutive pieces of one value and kind joined. JsonStreamError where the text
        stops being JSON (the pieces before it are lost with it: the caller gives up on the structure)."""
        self.pieces = []
        for character in text:
            self._character(character)
        joined: list[Piece] = []
        for piece in self.pieces:
            if joined and piece.kind != "end" and (joined[-1].path, joined[-1].kind) == (piece.path, piece.kind):
                joined[-1].text += piece.text
            else:
                joined.append(piece)
        return joined

    def _character(self, character: str) -> None:
        if self.literal and (character in WHITESPACE or character in ",]}"):
            self.literal = False  # a literal ends at the character after it, which is not its own
            self._value_ended()
            self._end_watched()
        raw, in_string = self._raw(), self.string is not None
        self._step(character)
        # The watched value's first and last characters are its own; whitespace between its tokens is not kept
        # (OpenAI's arguments are compact JSON, and a model may indent them).
        if (raw or self._raw()) and (in_string or character not in WHITESPACE):
            self._report("raw", character)
        self._end_watched()

    def _raw(self) -> bool:
        return self.watched is not None and self.watched.kind == "raw"

    def _end_watched(self) -> None:
        """Report the end of a watched value that ended with the character just read (after its last piece)."""
        if self.watched is not None and self.watched.ended:
            self._report("end")
            self.watched = None

    def _report(self, kind: Literal["raw", "text", "end"], text: str = "") -> None:
        assert self.watched is not None
        self.pieces.append(Piece(self.watched.path, kind, text))

    def _step(self, character: str) -> None:
        if self.string is not None:
            self._string_character(character)
        elif self.literal or character in WHITESPACE:
            pass
        elif self.expect == "value_or_close" and character == "]":
            self._close()
        elif self.expect in ("value", "value_or_close"):
            self._value_starts(character)
        elif self.expect == "key_or_close" and character == "}":
            self._close()
        elif self.expect in ("key", "key_or_close") and character == '"':
            self.string, self.key = "key", ""
        elif self.expect == "colon" and character == ":":
            self.expect = "value"
        elif self.expect == "comma_or_close" and character == ",":
            top = self.stack[-1]
            if isinstance(top.key, int):
                top.key += 1
                self.expect = "value"
            else:
                self.expect = "key"
        elif self.expect == "comma_or_close" and character == CLOSERS[self.stack[-1].opener]:
            self._close()
        else:
            raise JsonStreamError(f"unexpected {character!r} where a JSON text expects {self.expect}")

    def _path(self) -> Path:
        return tuple(frame.key for frame in self.stack if frame.key is not None)

    def _value_starts(self, character: str) -> None:
        if self.watched is None and (kind := self.watch(self._path(), character)) is not None:
            self.watched = _Watched(self._path(), kind, len(self.stack))
        if character in CLOSERS:
            self.stack.append(_Frame(character, None if character == "{" else 0))
            self.expect = "key_or_close" if character == "{" else "value_or_close"
        elif character == '"':
            self.string = "value"
        elif character in LITERAL_START:
            self.literal = True
        else:
            raise JsonStreamError(f"unexpected {character!r} where a JSON value starts")

    def _close(self) -> None:
        self.stack.pop()
        self._value_ended()

    def _value_ended(self) -> None:
        if self.watched is not None and len(self.stack) == self.watched.depth:
            self.watched.ended = True
        self.expect = "comma_or_close" if self.stack else "done"

    def _string_character(self, character: str) -> None:
        if self.escape:
            self.escape += character
            if len(self.escape) == (UNICODE_ESCAPE_LENGTH if self.escape[1] == "u" else SIMPLE_ESCAPE_LENGTH):
                escape, self.escape = self.escape, ""
                try:
                    self._string_text(json.loads(f'"{escape}"'))
                except ValueError:
                    raise JsonStreamError(f"invalid escape {escape!r} in a JSON string") from None
        elif character == "\\":
            self.escape = character
        elif character == '"':
            self._string_text("")  # a high surrogate without its low half
            whose, self.string = self.string, None
            if whose == "key":
                self.stack[-1].key = self.key
                self.expect = "colon"
            else:
                self._value_ended()
        else:
            self._string_text(character)

    def _string_text(self, text: str) -> None:
        """Decoded characters of the current string. A surrogate pair comes as two escapes: the high half waits
        for the low one, so that the two go out as one character."""
        if self.surrogate:  # a high half alone becomes U+FFFD: UTF-8, and so a document, cannot carry it
            pair = (self.surrogate + text).encode("utf-16", "surrogatepass")
            text, self.surrogate = pair.decode("utf-16", "replace"), ""
        elif len(text) == 1 and "\ud800" <= text <= "\udbff":
            self.surrogate = text
            return
        if not text:
            return
        if self.string == "key":
            self.key += text
        elif self.watched is not None and self.watched.kind == "text" and len(self.stack) == self.watched.depth:
            self._report("text", text)
