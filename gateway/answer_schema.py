"""The JSON Schemas OpenAI clients send, as the answer schema the engine holds an answer to (`json_schema`).

Two changes, neither of which lets through an answer the client's schema refuses:
- `closed`: an object that lists its properties and says nothing of others takes no others, as llama.cpp's
  schema-to-grammar reads it. JSON Schema's default (any other property) lets a small model ramble on into
  properties nobody asked for, often until max_tokens cuts the answer.
- `embedded`: a schema with references, put inside a larger one (a function's parameters inside the tool call
  format), moves under the larger one's `$defs`, its references rewritten to point where they did.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

# Where a schema holds schemas: one, a list of them, or a map of names to them (JSON Schema 2020-12, draft 7).
ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
       "unevaluatedItems", "unevaluatedProperties", "additionalItems")
LISTED = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
OTHERS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` whose objects with listed properties take no others unless it says they may."""
    copied = copy.deepcopy(schema)
    for node in subschemas(copied):
        if isinstance(node.get("properties"), dict) and not any(key in node for key in OTHERS):
            node["additionalProperties"] = False
    return copied


def subschemas(schema: Any) -> Iterable[dict[str, Any]]:
    """`schema` and every schema inside it (not the values of `const`, `enum` or `default`, which are data)."""
    if not isinstance(schema, dict):
        return
    yield schema
    for key in ONE:
        yield from subschemas(schema.get(key))
    for key in LISTED:
        if isinstance(schema.get(key), list):
            for item in schema[key]:
                yield from subschemas(item)
    for key in NAMED:
        if isinstance(schema.get(key), dict):
            for item in schema[key].values():
                yield from subschemas(item)


def embedded(schema: dict[str, Any], name: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`schema` as a part of a larger one whose `$defs` are `definitions`. One with local references (`#/$defs/
    Item`, pydantic's and the openai SDK's way for nested models) moves to `$defs/<name>`, its references
    rewritten to point inside it there; one without stays where it is put."""
    moved = copy.deepcopy(schema)
    holders = [node for node in subschemas(moved) if str(node.get("$ref", "")).startswith("#")]
    if not holders:
        return moved
    for holder in holders:
        holder["$ref"] = f"#/$defs/{name}{holder['$ref'][1:]}"
    definitions[name] = moved
    return {"$ref": f"#/$defs/{name}"}
