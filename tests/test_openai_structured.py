"""Structured outputs and tool calls through the OpenAI API, with the official SDK and its helpers against real
flows: on the embedded model, answers that parse and calls that are valid every time, streamed as OpenAI streams
them; on the tiny model, every malformed request a 400 that names the field and the problem."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, conint, constr

from harness.http import CHAT, COMPLETIONS, USER, sdk

MODEL = "test-model"  # the flows' model_name


class City(BaseModel):
    """Bounded, as a schema for a 135M model should be: an unbounded integer may take digits up to max_tokens."""

    name: constr(max_length=40)  # type: ignore[valid-type]  # pydantic 1's constrained types
    country: constr(max_length=40)  # type: ignore[valid-type]
    founded: conint(ge=-3000, le=2100)  # type: ignore[valid-type]


class GetWeather(BaseModel):
    """The weather in a city."""

    city: constr(max_length=40)  # type: ignore[valid-type]


WEATHER = openai.pydantic_function_tool(GetWeather, name="get_weather")
ADD = {"type": "function", "function": {"name": "add", "description": "The sum of two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 1000},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 1000}},
    "required": ["a", "b"]}}}
CITIES = ["Tell me about Tokyo.", "Describe Paris.", "What do you know about Rome?", "Cairo, please."]
WEATHER_QUESTIONS = ["What's the weather in Paris?", "Is it raining in London?", "Hello! How are you?"]


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.mark.e2e
@pytest.mark.parametrize("question", CITIES)
async def test_parse_returns_an_object_that_validates_every_time(embedded_service, question):
    answer = await sdk(embedded_service).chat.completions.parse(
        model=MODEL, messages=ask(question), response_format=City, max_tokens=80)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City) and choice.message.parsed == City.parse_raw(choice.message.content)


@pytest.mark.e2e
async def test_a_streamed_json_schema_answer_concatenates_to_json_that_validates(embedded_service):
    client = sdk(embedded_service)
    async with client.chat.completions.stream(model=MODEL, messages=ask(CITIES[0]), response_format=City,
                                              max_tokens=80) as stream:
        pieces = [event.delta async for event in stream if event.type == "content.delta"]
        final = await stream.get_final_completion()
    assert len(pieces) > 5  # token by token
    assert City.parse_raw("".join(pieces)) == final.choices[0].message.parsed
    unary = await client.chat.completions.parse(model=MODEL, messages=ask(CITIES[0]), response_format=City,
                                                max_tokens=80)
    assert unary.choices[0].message.content == "".join(pieces)  # greedy: the same answer either way


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
async def test_completions_take_the_same_response_format(embedded_service, stream):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"]}
    # OpenAI's completions have no response_format (vLLM's and llama.cpp's do): the SDK sends it as an extra.
    answer = await sdk(embedded_service).completions.create(
        model=MODEL, prompt="Is Paris in France? Answer as JSON:", max_tokens=30, stream=stream,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": schema}}})
    text = "".join([chunk.choices[0].text async for chunk in answer]) if stream else answer.choices[0].text
    assert json.loads(text)["answer"] in ("yes", "no") and set(json.loads(text)) == {"answer"}


@pytest.mark.e2e
async def test_json_object_is_a_json_object(embedded_service):
    answer = await sdk(embedded_service).chat.completions.create(
        model=MODEL, messages=ask("Give the name and country of Tokyo as JSON."), max_tokens=120,
        response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.e2e
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("question", [*WEATHER_QUESTIONS, "What is 2 plus 3?"])
async def test_required_and_named_always_give_a_valid_call(embedded_service, tool_choice, question):
    answer = await sdk(embedded_service).chat.completions.create(
        model=MODEL, messages=ask(question), tools=[WEATHER, ADD], tool_choice=tool_choice, max_tokens=60)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            GetWeather.parse_obj(arguments)
        else:
            assert call.function.name == "add" and set(arguments) == {"a", "b"}
            assert all(isinstance(value, int) and 0 <= value <= 1000 for value in arguments.values())
    if isinstance(tool_choice, dict):
        assert {call.function.name for call in choice.message.tool_calls} == {"add"}


@pytest.mark.e2e
async def test_one_call_without_parallel_tool_calls(embedded_service):
    answer = await sdk(embedded_service).chat.completions.create(
        model=MODEL, messages=ask(WEATHER_QUESTIONS[0]), tools=[WEATHER, ADD], tool_choice="required",
        parallel_tool_calls=False, max_tokens=60)
    calls = answer.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


@pytest.mark.e2e
async def test_auto_chooses_between_text_and_a_call(embedded_service):
    """The embedded model answers a weather question with a call and a haiku with text (greedy, so always the
    same); the text comes as content, unescaped, streamed as it arrives."""
    client = sdk(embedded_service)
    called = await client.chat.completions.create(model=MODEL, messages=ask(WEATHER_QUESTIONS[0]), tools=[WEATHER],
                                                  max_tokens=60)
    assert called.choices[0].finish_reason == "tool_calls"
    assert json.loads(called.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    haiku = ask("Write a haiku about the sea.")
    replied = await client.chat.completions.create(model=MODEL, messages=haiku, tools=[WEATHER], max_tokens=60)
    message = replied.choices[0].message
    assert replied.choices[0].finish_reason in ("stop", "length") and message.tool_calls is None
    assert message.content and not message.content.startswith("{") and "\\" not in message.content  # unescaped
    chunks = [chunk async for chunk in await client.chat.completions.create(
        model=MODEL, messages=haiku, tools=[WEATHER], max_tokens=60, stream=True)]
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert "".join(pieces) == message.content and len(pieces) > 5


@pytest.mark.e2e
async def test_streamed_calls_come_as_openai_sends_them_and_the_sdk_assembles_them(embedded_service):
    client = sdk(embedded_service)
    request = dict(model=MODEL, messages=ask(WEATHER_QUESTIONS[1]), tools=[WEATHER], tool_choice="required",
                   max_tokens=60)
    chunks = [chunk async for chunk in await client.chat.completions.create(**request, stream=True)]
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    first, *rest = deltas
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    async with client.chat.completions.stream(**request) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.arguments == arguments and call.function.parsed_arguments == GetWeather.parse_raw(arguments)
    unary = await client.chat.completions.create(**request)
    assert unary.choices[0].message.tool_calls[0].function.arguments == arguments


@pytest.mark.e2e
@pytest.mark.parametrize("tool_choice", ["none", "auto"])
async def test_tool_messages_in_the_history(embedded_service, tool_choice):
    """The agent loop's second turn: the assistant's call and the tool's result, in roles the template takes."""
    history = [*ask(WEATHER_QUESTIONS[0]),
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22 degrees"}]
    answer = await sdk(embedded_service).chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice=tool_choice, max_tokens=40)
    message = answer.choices[0].message
    if tool_choice == "none":
        assert message.content and message.tool_calls is None
    else:
        assert message.content or [GetWeather.parse_raw(call.function.arguments) for call in message.tool_calls]


def nested(depth: int) -> dict:
    """An array of arrays ... of integers, `depth` levels deep: deeper than the engine takes (max_schema_depth)."""
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


REFUSED = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "book_flight"}}}, "tool_choice",
     "names function 'book_flight', which is not among the tools (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice", 'tool_choice "required" needs tools'),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice", 'must be "none", "auto", "required" or'),
    ({"parallel_tool_calls": True}, "parallel_tool_calls", "parallel_tool_calls needs tools"),
    ({"tools": []}, "tools", "tools must hold at least one function"),
    ({"tools": [{"type": "function"}]}, "tools", "tools.0.function: field required"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "tool type must be 'function'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools",
     "the function name 'get weather' must be 1 to 64 letters, digits, underscores or dashes"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools",
     "the parameters of function 'f' must be a JSON Schema of type object, got type \"array\""),
    ({"tools": [WEATHER, WEATHER]}, "tools", "each function needs its own name: get_weather appears more than once"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "colour"}}}}}]}, "tools", "does not compile"),
    ({"functions": [{"name": "f"}]}, "functions", "send tools (functions is their deprecated form)"),
    ({"response_format": {"type": "xml"}}, "response_format",
     "response_format type must be one of text, json_object, json_schema, got 'xml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format", 'type "json_schema" needs json_schema'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format",
     "response_format.json_schema.name: field required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}}},
     "response_format", "does not compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested(40)}}},
     "response_format", "levels deep; the limit is"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages",
     "messages.0.tool_call_id: a tool message needs the tool_call_id of the call it answers"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": {
        "name": "f", "arguments": "{}"}}]}]}, "messages", "only assistant messages carry tool_calls, not 'user' ones"),
]


@pytest.mark.parametrize("fields, param, message", REFUSED, ids=[
    "unknown-function", "choice-without-tools", "unknown-choice", "parallel-without-tools", "no-tools",
    "no-function", "not-a-function", "bad-name", "not-an-object", "same-name", "tool-schema-does-not-compile",
    "functions", "unknown-format", "json-schema-missing", "schema-name-missing", "schema-does-not-compile",
    "schema-too-deep", "tool-message-without-id", "calls-of-a-user"])
async def test_bad_tools_and_formats_are_a_400_naming_the_problem(tiny_service, fields, param, message):
    body = {"messages": USER, "max_tokens": 3, **fields}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


async def test_completions_refuse_a_schema_that_does_not_compile_naming_response_format(tiny_service):
    body = {"prompt": "hi", "max_tokens": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}}}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.post(COMPLETIONS, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith("response_format: the json_schema does not compile")
    assert error["param"] == "response_format"
