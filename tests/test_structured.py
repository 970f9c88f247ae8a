"""Structured outputs in the engine: every token of a constrained request is one its grammar allows.

The tiny model's weights are random, so whatever it writes unconstrained is not JSON: a constrained answer that
parses is the constraint's doing."""

import asyncio
import json
import re

import pytest

from engine import (
    Constraint,
    ConstraintKind,
    EngineConfig,
    FinishReason,
    InvalidRequest,
    LLMEngine,
    SamplingParams,
    load_model,
)
from engine.structured import GrammarLimits, Grammars

# Every string and list is bounded, so that a random model's answer ends well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "role": {"enum": ["reader", "writer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "admin", "role", "tags"],
    "additionalProperties": False,
}
ANSWER_REGEX = r"(yes|no), because [a-z ]{3,20}\."


def schema(value: dict) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(value))


def nested_arrays(depth: int) -> dict:
    """A schema of `depth` nested objects: arrays of arrays of ... strings."""
    value: dict = {"type": "string"}
    for _ in range(depth - 1):
        value = {"type": "array", "items": value}
    return value


def assert_person(text: str) -> None:
    person = json.loads(text)
    assert list(person) == ["name", "age", "admin", "role", "tags"]  # llguidance keeps the schema's order
    assert isinstance(person["name"], str) and len(person["name"]) <= 12
    assert type(person["age"]) is int and 0 <= person["age"] <= 120
    assert type(person["admin"]) is bool and person["role"] in ("reader", "writer")
    assert len(person["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 6 for t in person["tags"])


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "transformers"])
def tiny_engine(request, tiny_model_dir):
    config = EngineConfig(max_running=8, prefill_chunk=64, fast_path=request.param, max_schema_depth=8)
    engine = LLMEngine(load_model(str(tiny_model_dir), dtype="float32"), config)
    yield engine
    engine.close()


async def generate(engine: LLMEngine, prompt: str = "Tell me about someone.", **params):
    params.setdefault("max_tokens", 200)
    prompt_ids = engine.processor.prepare(prompt, SamplingParams(**params))
    return [o async for o in engine.generate(prompt_ids, SamplingParams(**params))]


async def test_a_json_schema_answer_parses_and_validates_greedy_and_sampled(tiny_engine):
    unconstrained = await generate(tiny_engine, max_tokens=60)
    with pytest.raises(ValueError):
        json.loads(unconstrained[-1].generated_text)
    for sampling in ({}, {"temperature": 1.0, "seed": 1}, {"temperature": 0.8, "top_p": 0.9, "seed": 2}):
        outputs = await generate(tiny_engine, constraint=schema(PERSON), **sampling)
        assert outputs[-1].finish_reason is FinishReason.EOS, outputs[-1].generated_text
        assert_person(outputs[-1].generated_text)
        # The stream's pieces are the answer, and the step that closed the object was the last.
        assert "".join(o.text for o in outputs) == outputs[-1].generated_text
        assert outputs[-1].text.endswith("}") or outputs[-1].generated_text.endswith("}")


async def test_a_regex_and_a_lark_grammar_are_matched_whole(tiny_engine):
    outputs = await generate(tiny_engine, constraint=Constraint(ConstraintKind.REGEX, ANSWER_REGEX))
    assert re.fullmatch(ANSWER_REGEX, outputs[-1].generated_text)
    lark = 'start: sum\nsum: NUMBER (" + " NUMBER){1,3}\nNUMBER: /[1-9][0-9]{0,2}/'
    outputs = await generate(tiny_engine, constraint=Constraint(ConstraintKind.GRAMMAR, lark), temperature=1.0, seed=5)
    assert re.fullmatch(r"[1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2}){1,3}", outputs[-1].generated_text)


async def test_a_cut_at_max_tokens_inside_the_answer_ends_with_length(tiny_engine):
    outputs = await generate(tiny_engine, constraint=schema(PERSON), max_tokens=4)
    assert outputs[-1].finish_reason is FinishReason.LENGTH and len(outputs) == 4
    assert outputs[-1].generated_text.startswith("{")


async def test_constrained_and_free_rows_in_one_batch_get_what_they_get_alone(tiny_engine):
    """The masks are per row: a constrained neighbour changes no token of a free stream, and the reverse."""
    free_alone = await generate(tiny_engine, "Write a story.", max_tokens=30)
    person_alone = await generate(tiny_engine, constraint=schema(PERSON))
    together = await asyncio.gather(
        generate(tiny_engine, "Write a story.", max_tokens=30),
        generate(tiny_engine, constraint=schema(PERSON)),
        generate(tiny_engine, "Other words.", constraint=Constraint(ConstraintKind.REGEX, ANSWER_REGEX)),
        generate(tiny_engine, "More words.", max_tokens=30),
    )
    assert [o.token_id for o in together[0]] == [o.token_id for o in free_alone]
    assert [o.token_id for o in together[1]] == [o.token_id for o in person_alone]
    assert re.fullmatch(ANSWER_REGEX, together[2][-1].generated_text)


async def test_stop_strings_and_logprobs_work_on_a_constrained_stream(tiny_engine):
    whole = await generate(tiny_engine, constraint=schema(PERSON), logprobs=True, top_logprobs=2)
    text = whole[-1].generated_text
    assert all(o.logprobs is not None and len(o.logprobs.top_ids) == 2 for o in whole)
    stopped = await generate(tiny_engine, constraint=schema(PERSON), stop=('"age"',))
    assert stopped[-1].finish_reason is FinishReason.STOP
    assert stopped[-1].generated_text == text[: text.index('"age"')]


@pytest.mark.parametrize(
    "constraint, message",
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "strin"}'), "the json_schema does not compile: "),
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": '), "the json_schema is not JSON"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "the json_schema must be a JSON object, got list"),
        (Constraint(ConstraintKind.REGEX, "a(b"), "the regex does not compile: "),
        (Constraint(ConstraintKind.GRAMMAR, "start: nothing_defined"), "the grammar does not compile: "),
        (schema(nested_arrays(9)), "the json_schema nests 9 levels deep; the limit is 8 levels"),
        (Constraint(ConstraintKind.REGEX, "a" * 70000), "the regex is 70000 characters; the limit is 65536 characters"),
    ],
)
async def test_a_constraint_that_cannot_be_used_is_refused_naming_the_problem(tiny_engine, constraint, message):
    params = SamplingParams(max_tokens=8, constraint=constraint)
    with pytest.raises(InvalidRequest, match="^" + re.escape(message)):
        tiny_engine.processor.prepare("hello", params)
    # A caller that skipped prepare gets the same refusal as its stream's only output; the engine serves on.
    outputs = [o async for o in tiny_engine.generate(tiny_engine.processor.tokenize("hello"), params)]
    assert len(outputs) == 1 and outputs[0].error.startswith(message)
    assert_person((await generate(tiny_engine, constraint=schema(PERSON)))[-1].generated_text)


def test_a_repeated_constraint_is_compiled_once_and_the_cache_is_bounded(tiny_model_dir, monkeypatch):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    grammars = Grammars(loaded.tokenizer, loaded.model.config.vocab_size, [0], GrammarLimits(1000, 8, cache_size=2))
    compiled = []
    compile_once = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda c: compiled.append(c) or compile_once(c))
    a, b, c = (Constraint(ConstraintKind.REGEX, r) for r in ("a+", "b+", "c+"))
    for constraint in (a, a, b, a, c, a, b):
        grammars.check(constraint)
        grammars.matcher(constraint)
    # Kept: the 2 most recently used. b fell out when c came and is compiled again at the end.
    assert compiled == [a, b, c, b]
