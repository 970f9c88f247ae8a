"""Tool calls in a chat template's own syntax, the Hermes one of Qwen2.5's and Qwen3's templates, on the tiny random
model given such a template (conftest's hermes_model_dir): how the service finds the syntax in a template, the
grammar an answer is held to, the reader that turns it back into OpenAI's calls as it streams, and the real flow
with the openai SDK. The embedded model's template has none: it keeps the generic format
(tests/test_openai_structured.py, tests/test_tool_format.py)."""

from __future__ import annotations

import json

import httpx
import llguidance
import llguidance.hf
import pytest
from docarray import DocList
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.prompts import HERMES, PromptEncoder
from gateway.hermes import HermesReader
from gateway.openai_api import ChatRequest, parse_request
from gateway.tools import AnswerReader
from harness.http import CHAT, sdk
from harness.service import grpc_client, stream_docs
from schemas import ModelInfoDocument
from tests.test_tool_format import read as read_with

MODEL = "test-model"  # the flows' model_name
# Bounded arguments: a random model writes whatever the grammar lets it, up to max_tokens.
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}}
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
HISTORY = [*QUESTION,
           {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22 degrees"}]
# The history as the template takes it: the call's arguments a JSON value, which it writes with `tojson`.
TEMPLATE_HISTORY = [
    *QUESTION,
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22 degrees"},
]
CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
CALL_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_INFO = ModelInfoDocument(tool_format=HERMES, tool_tokens=["<tool_call>", "</tool_call>"])


@pytest.fixture(scope="module")
def hermes_tokenizer(hermes_model_dir):
    return AutoTokenizer.from_pretrained(hermes_model_dir)


def test_the_syntax_is_found_in_what_the_template_renders(hermes_tokenizer, embedded_dir):
    hermes = PromptEncoder(hermes_tokenizer)
    assert (hermes.tool_syntax, hermes.tool_tokens) == (HERMES, ("<tool_call>", "</tool_call>"))
    assert PromptEncoder(AutoTokenizer.from_pretrained(embedded_dir)).tool_syntax is None  # no tools rendered
    # A template that renders tools and results, but calls in a syntax of its own (as Llama 3.1's JSON) is not
    # the Hermes one.
    other = AutoTokenizer.from_pretrained(embedded_dir)
    other.chat_template = ("{{ tools | tojson }}{% for m in messages %}{{ m.content }}{{ m.tool_calls | tojson }}"
                           "{% endfor %}")
    assert PromptEncoder(other).tool_syntax is None


def test_history_and_tools_go_into_the_template_natively(hermes_tokenizer):
    text = hermes_tokenizer.decode(PromptEncoder(hermes_tokenizer).encode(TEMPLATE_HISTORY, tools=[WEATHER]))
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert f"<|im_start|>assistant\n{CALL_WEATHER}<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 22 degrees\n</tool_response><|im_end|>" in text


def matcher(tokenizer, grammar: str):
    """Whether llguidance's compiled grammar takes a text: what the engine holds answers to."""
    tokens = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id])

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(tokens, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()

    return accepts


def grammar(info: ModelInfoDocument, **fields) -> str:
    body = {"messages": QUESTION, "tools": [ADD, WEATHER], **fields}
    return parse_request(ChatRequest, body).document_fields(info)["grammar"]


@pytest.mark.parametrize("tags", ["tokens", "text"])
@pytest.mark.parametrize("fields, accepted, refused", [
    ({}, ["hello", "", CALL_ADD, f"Let me see.\n{CALL_ADD}", f"{CALL_ADD}\n{CALL_WEATHER}", "a <tool_call"],
     [CALL_ADD.replace(", ", ","), f"{CALL_ADD} and more", "a <tool_call> b"]),
    ({"tool_choice": "required"}, [CALL_WEATHER, f"{CALL_ADD}\n{CALL_WEATHER}"],
     ["hello", "", f"Let me see.\n{CALL_ADD}", CALL_ADD.replace('"b": 2', '"b": 2, "c": 3')]),
    ({"tool_choice": "required", "parallel_tool_calls": False}, [CALL_ADD], [f"{CALL_ADD}\n{CALL_WEATHER}"]),
    ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, [CALL_ADD], [CALL_WEATHER]),
    ({"response_format": {"type": "json_object"}}, ['{"k": "v"}', CALL_ADD], ["hello"]),
], ids=["auto", "required", "required-single", "named", "auto-json-response"])
def test_the_grammar_takes_the_syntax_and_nothing_else(hermes_tokenizer, embedded_dir, tags, fields, accepted,
                                                       refused):
    """Where the tags are tokens of their own (Qwen's vocabulary) and where they are text."""
    tokenizer = hermes_tokenizer if tags == "tokens" else AutoTokenizer.from_pretrained(embedded_dir)
    info = HERMES_INFO if tags == "tokens" else ModelInfoDocument(tool_format=HERMES, tool_tokens=[])
    accepts = matcher(tokenizer, grammar(info, **fields))
    assert [text for text in accepted if not accepts(text)] == []
    assert [text for text in refused if accepts(text)] == []


QUOTED = CALL_WEATHER.replace("Paris", 'Pa\\"ris')  # an escape the reader decodes
ANSWER = f"Let me <see>.\n{QUOTED}\n{CALL_ADD}"


def read(text: str, cuts: list[int]) -> tuple[AnswerReader, str, dict[int, dict]]:
    return read_with(text, cuts, HermesReader())


@given(st.lists(st.integers(0, len(ANSWER)), max_size=12))
def test_calls_streamed_in_any_pieces_assemble_to_the_whole_calls(cuts):
    reader, content, calls = read(ANSWER, cuts)
    assert content == "Let me <see>.\n" == reader.content and reader.whole
    assert [(call["name"], json.loads(call["arguments"])) for call in calls.values()] == [
        ("get_weather", {"city": 'Pa"ris'}), ("add", {"a": 1, "b": 2})]
    assert [call["function"]["arguments"] for call in reader.calls] == ['{"city":"Pa\\"ris"}', '{"a":1,"b":2}']
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text, content, whole", [
    ("I think <tool_c", "I think <tool_c", False),  # held back while it may begin the tag, content at the end
    (CALL_ADD[:-5], "", False),  # cut by max_tokens
    (f"{CALL_ADD}\n<tool", "", False),
    (f"{CALL_ADD}\nthen text", "then text", False),  # out of the syntax (a model not held to it): content
])
def test_answers_that_are_not_whole_calls(text, content, whole):
    reader, shown, _ = read(text, [len(text) // 2])
    assert (shown.removeprefix("\n"), reader.whole) == (content, whole)


# The real flow ---------------------------------------------------------------------------------------------------


async def info(service) -> ModelInfoDocument:
    """The executor's /info, as the gateway asks it (gateway/model_info.py)."""
    infos = DocList[ModelInfoDocument]
    async for docs in grpc_client(service.grpc_port).post(on="/info", inputs=infos([ModelInfoDocument()]),
                                                          return_type=infos):
        return docs[0]
    raise AssertionError("/info answered nothing")


async def test_the_executor_reports_the_syntax_and_the_embedded_template_has_none(hermes_service, tiny_service):
    hermes = await info(hermes_service)
    assert (hermes.tool_format, hermes.tool_tokens) == (HERMES, ["<tool_call>", "</tool_call>"])
    assert (await info(tiny_service)).tool_format is None  # SmolLM2's template: the generic format


def valid(call) -> bool:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return arguments in ({"city": "Paris"}, {"city": "London"})
    return call.function.name == "add" and set(arguments) == {"a", "b"} and all(
        isinstance(value, int) and 0 <= value <= 9 for value in arguments.values())


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
async def test_required_and_named_are_valid_calls_unary_and_streamed(hermes_service, choice):
    client = sdk(hermes_service)
    request = dict(model=MODEL, messages=QUESTION, tools=[WEATHER, ADD], tool_choice=choice,
                   parallel_tool_calls=False, max_tokens=60)
    unary = (await client.chat.completions.create(**request)).choices[0]
    assert unary.finish_reason == "tool_calls" and unary.message.content is None
    [call] = unary.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and valid(call)
    if isinstance(choice, dict):
        assert call.function.name == "add"
    chunks = [chunk async for chunk in await client.chat.completions.create(**request, stream=True)]
    first, *rest = [delta for chunk in chunks for delta in chunk.choices[0].delta.tool_calls or []]
    assert (first.index, first.type, first.function.name) == (0, "function", call.function.name)
    assert rest and all(delta.id is None and delta.function.name is None for delta in rest)
    assert "".join(delta.function.arguments or "" for delta in [first, *rest]) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    async with client.chat.completions.stream(**request) as stream:  # the SDK's helper assembles the deltas
        final = (await stream.get_final_completion()).choices[0].message.tool_calls[0]
    assert (final.function.name, final.function.arguments) == (call.function.name, call.function.arguments)


async def test_parallel_calls_are_each_valid(hermes_service):
    answer = await sdk(hermes_service).chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required", max_tokens=120)
    choice = answer.choices[0]
    whole = choice.message.tool_calls if choice.finish_reason == "tool_calls" else choice.message.tool_calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length") and whole and all(map(valid, whole))


async def test_auto_answers_text_or_a_valid_call(hermes_service, hermes_tokenizer):
    """The random model is steered by logit_bias on the opening tag's token: towards it, a call; away, text."""
    tag = str(hermes_tokenizer.convert_tokens_to_ids("<tool_call>"))
    client = sdk(hermes_service)
    request = dict(model=MODEL, messages=QUESTION, tools=[WEATHER, ADD], parallel_tool_calls=False, max_tokens=30)
    called = (await client.chat.completions.create(**request, logit_bias={tag: 100})).choices[0]
    assert called.finish_reason == "tool_calls" and valid(called.message.tool_calls[0])
    replied = (await client.chat.completions.create(**request, logit_bias={tag: -100})).choices[0]
    assert replied.message.tool_calls is None and replied.message.content
    assert "<tool_call>" not in replied.message.content
    chunks = [chunk async for chunk in await client.chat.completions.create(
        **request, logit_bias={tag: -100}, stream=True)]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == replied.message.content


@pytest.mark.parametrize("choice", ["none", "auto"])
async def test_history_with_tool_results_goes_into_the_template_natively(hermes_service, hermes_tokenizer, choice):
    """The prompt the flow served is the template's own rendering of the calls, the results and (unless none)
    the tools: its token count is that rendering's, which test_history_and_tools_go_into_the_template_natively
    reads."""
    answer = await sdk(hermes_service).chat.completions.create(
        model=MODEL, messages=HISTORY, tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False,
        max_tokens=20)
    tools = None if choice == "none" else [WEATHER]
    expected = PromptEncoder(hermes_tokenizer).encode(TEMPLATE_HISTORY, tools=tools)
    assert answer.usage.prompt_tokens == len(expected)


async def test_a_parameters_schema_that_does_not_compile_is_a_400_naming_tools(hermes_service):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "colour"}}}}}
    async with httpx.AsyncClient(base_url=hermes_service.url, timeout=60) as client:
        response = await client.post(CHAT, json={"messages": QUESTION, "max_tokens": 3, "tools": [bad]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("tools: the grammar does not compile") and error["param"] == "tools"


async def test_tools_on_grpc_need_a_template_with_a_tool_syntax(tiny_service):
    [doc] = await stream_docs(tiny_service, messages=QUESTION, tools=[WEATHER], max_tokens=5)
    assert doc.error_code == "invalid_request" and "tools need a chat template with a tool syntax" in doc.error
