"""The generic tool format without a model: answers read back as they arrive, in any cut into pieces, the same as
whole; the schema llguidance compiles, with a parameters schema's references still pointing where they did."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from gateway.json_stream import JsonStream
from gateway.openai_api import ChatRequest, parse_request
from gateway.tools import AnswerReader, GenericReader
from schemas import ModelInfoDocument

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
# pydantic's way (and the openai SDK's pydantic_function_tool's) with a nested model: a reference into `$defs`.
ORDER = {"type": "function", "function": {"name": "order", "parameters": {
    "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
    "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}}}}}

# Escapes a reader must decode, though llguidance's JSON writes \u only for control characters.
PARALLEL = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\\"ris \\u00e9\\ud83d\\ude00"}}, '
            '{"name":"add","arguments":{"a":1,"b":-25}}]}')
TWO_CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
             '{"name":"add","arguments":{"a":1,"b":-25}}]}')


def read(text: str, cuts: list[int], reader: AnswerReader | None = None) -> tuple[AnswerReader, str, dict[int, dict]]:
    """The reader (a GenericReader unless given) after `text` fed in the pieces `cuts` make, with the content and
    the calls its deltas add up to (assembled as a client does: the first delta of a call has its id and name,
    later ones add arguments)."""
    reader, content, calls = reader or GenericReader(), "", {}
    bounds = [0, *sorted(cuts), len(text)]
    for start, end in zip(bounds, bounds[1:]):
        piece, deltas = reader.feed(text[start:end])
        content += piece
        for delta in deltas:
            call = calls.setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in delta:
                assert call["id"] is None and delta["type"] == "function"
                call.update(id=delta["id"], name=delta["function"]["name"])
            call["arguments"] += delta["function"]["arguments"]
    return reader, content + reader.finish(), calls


@given(st.lists(st.integers(0, len(PARALLEL)), max_size=12))
def test_calls_streamed_in_any_pieces_assemble_to_the_whole_calls(cuts):
    reader, content, calls = read(PARALLEL, cuts)
    assert content == "" and reader.whole
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in reader.calls] == [
        (calls[i]["id"], calls[i]["name"], calls[i]["arguments"]) for i in range(2)]
    assert [json.loads(call["arguments"]) for call in calls.values()] == [
        {"city": 'Pa"ris \u00e9\U0001F600'}, {"a": 1, "b": -25}]
    assert all(call["id"].startswith("call_") for call in calls.values())
    assert calls[0]["id"] != calls[1]["id"]


@given(st.lists(st.integers(0, 60), max_size=8))
def test_a_response_streams_as_its_unescaped_text(cuts):
    text = '{"response": "line one\\nline \\"two\\" \\ud83d\\ude00 \\\\ done"}'
    reader, content, calls = read(text, [cut for cut in cuts if cut <= len(text)])
    assert content == 'line one\nline "two" \U0001F600 \\ done' == reader.content
    assert calls == {} and reader.whole


def test_a_response_of_a_schema_is_its_json_text():
    reader, content, _ = read('{"response": {"answer": [1, 2]}}', [5, 17])
    assert json.loads(content) == {"answer": [1, 2]} and reader.whole


def test_an_answer_cut_short_is_not_whole():
    reader, _, calls = read('{"tool_call": {"name": "add", "arguments": {"a": 1', [20])
    assert calls[0]["arguments"] == '{"a":1' and not reader.whole


def test_text_that_is_not_the_format_is_content_as_it_came():
    reader, content, calls = read("Hello there", [3])
    assert content == "Hello there" and calls == {} and not reader.whole


def test_a_watched_value_comes_compact_and_ends_after_its_last_piece():
    stream = JsonStream(lambda path, first: "raw" if path == ("a",) else None)
    assert [(piece.kind, piece.text) for piece in stream.feed('{"a": [1,\n  {"b": -2.5e3, "c d": " "}], "e": 3}')] == [
        ("raw", '[1,{"b":-2.5e3,"c d":" "}]'), ("end", "")]
    assert stream.done


@pytest.fixture(scope="module")
def matcher(tiny_model_dir):
    """Whether llguidance's compiled form of a schema takes a text: what the engine holds answers to."""
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)

    def accepts(schema: dict, text: str) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar) == (False, [])  # (is_error, warnings)
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        return matcher.consume_tokens(hf_tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()

    return accepts


def schema(**fields) -> dict:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields}
    return parse_request(ChatRequest, body).document_fields(ModelInfoDocument())["json_schema"]


@pytest.mark.parametrize("fields, accepted, refused", [
    ({"tools": [WEATHER, ADD]}, [TWO_CALLS, '{"response": "hi"}'], ['{"tool_calls": []}', '{"tool_call": {}}']),
    ({"tools": [WEATHER, ADD], "parallel_tool_calls": False, "tool_choice": "required"},
     ['{"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}'],
     ['{"response": "hi"}', '{"tool_call": {"name": "add", "arguments": {"a": "one", "b": 2}}}',
      '{"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}}']),
    ({"tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}},
     ['{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}'],
     ['{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}']),
    ({"tools": [ORDER], "tool_choice": "required"},
     ['{"tool_calls": [{"name": "order", "arguments": {"item": {"sku": "a1"}}}]}'],
     ['{"tool_calls": [{"name": "order", "arguments": {"item": {"sku": 1}}}]}']),
    ({"tools": [{"type": "function", "function": {"name": "now"}}], "tool_choice": "required"},
     ['{"tool_calls": [{"name": "now", "arguments": {}}]}'],
     ['{"tool_calls": [{"name": "now", "arguments": {"x": 1}}]}']),
    ({"tools": [ADD], "response_format": {"type": "json_object"}}, ['{"response": {"k": "v"}}'],
     ['{"response": "text"}']),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object"}}}}}},
     ['{"a": 1}', '{}', '{"b": {"any": "thing"}}'], ['{"a": 1, "c": 2}', '[]']),
    ({"response_format": {"type": "json_object"}}, ['{"any": [1]}'], ['"text"', '[1]']),
], ids=["auto", "required-single", "named", "references", "no-parameters", "auto-json-response", "json-schema",
        "json-object"])
def test_the_answer_schema_takes_the_format_and_nothing_else(matcher, fields, accepted, refused):
    answer = schema(**fields)
    assert all(matcher(answer, text) for text in accepted)
    assert not any(matcher(answer, text) for text in refused)
