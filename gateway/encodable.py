"""What a document can carry to the executor: the one check every transport runs before it sends anything.

DocArray sends a document's fields as protobuf `NodeProto`s: text as a protobuf string (UTF-8, so a lone surrogate
such as the JSON escape "\\ud800" cannot be encoded), whole numbers as `int32`. A value outside those failed only
when the gateway encoded the document for the executor, which the stream took for a broken connection (503
`unavailable`). Numbers must also be finite: JSON's NaN and Infinity parse as floats, and no setting takes them.
`unencodable` finds the first such value and names its field, so that each transport answers a 400.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gateway.openai_api import OpenAIError

# NodeProto's `integer` field is an int32 (docarray's protobuf), whatever the Python field's type says.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Unencodable:
    """The first value the document cannot carry: `param` is its field's path (`messages.1.content`)."""

    param: str
    problem: str

    @property
    def message(self) -> str:
        return f"`{self.param}` {self.problem}"


def unencodable(value: BaseModel | dict, prefix: str = "") -> Unencodable | None:
    """The first field of `value` (a PromptDocument, a request that becomes one, or a message's JSON object) whose
    value a document cannot carry, with what is wrong with it; None when every value can go."""
    for path, leaf in _values(value, prefix):
        if (problem := _problem(leaf)) is not None:
            return Unencodable(path, problem)
    return None


def require_encodable(value: BaseModel | dict, prefix: str = "") -> None:
    """OpenAIError 400 naming the first value of `value` a document cannot carry (the HTTP transports' answer)."""
    if (bad := unencodable(value, prefix)) is not None:
        raise OpenAIError(400, bad.message, param=bad.param, code="invalid_value")


def _values(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every leaf value under `value` with its path; a dict's keys are leaves too (they travel as text)."""
    if isinstance(value, BaseModel):
        for name in value.__fields__:
            yield from _values(getattr(value, name), _join(path, name))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield path, key
            yield from _values(item, _join(path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _values(item, f"{path}.{index}")
    else:
        yield path, value


def _join(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


def _problem(value: Any) -> str | None:
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            bad = ord(value[error.start])
            return (f"holds a lone surrogate (U+{bad:04X}) at character {error.start}, which UTF-8 cannot encode: "
                    "send valid Unicode text")
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            return f"is {value}, outside the range a whole number can take here ({INT_MIN} to {INT_MAX})"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None
