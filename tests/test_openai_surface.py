"""The OpenAI API beyond the basics, with the official SDK against a real flow: the model as the executor names
it (no gateway setting), penalties and logit_bias reaching the engine, OpenAI's ranges, and the fields this
service does not implement refused with a 400 that says so (tools and response_format: test_openai_structured.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from harness.http import CHAT, COMPLETIONS, USER, sdk
from harness.service import TINY_LIMITS, Service, serve, stream_docs


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    """The tiny model's flow with no `model_name`: the gateway serves the model under the executor's id."""
    uses_with = {"model": str(tiny_model_dir), **TINY_LIMITS}
    with serve(tmp_path_factory, "surface-flow", uses_with, model_name=None) as flow:
        yield flow


@pytest.fixture(scope="module")
def model_id(tiny_model_dir) -> str:
    return tiny_model_dir.name  # a local directory is served by its name


async def test_the_model_is_named_by_the_executor(service, model_id):
    client = sdk(service)
    models = await client.models.list()
    assert [model.id for model in models.data] == [model_id]
    assert models.data[0].to_dict()["max_model_len"] == 4096
    assert (await client.models.retrieve(model_id)).id == model_id
    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("gpt-4o")
    assert raised.value.code == "model_not_found"
    answer = await client.chat.completions.create(model=model_id, messages=USER, max_tokens=3)
    assert answer.model == model_id and answer.system_fingerprint.startswith("fp_")
    chunks = [c async for c in await client.completions.create(model=model_id, prompt="hi", max_tokens=3, stream=True)]
    assert {c.system_fingerprint for c in chunks} == {answer.system_fingerprint}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_an_unknown_model_is_404_model_not_found(service, path):
    body = {"model": "gpt-4o", "max_tokens": 3, **({"messages": USER} if path == CHAT else {"prompt": "hi"})}
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4o" in error["message"]


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"repetition_penalty": 3.0}], ids=lambda penalty: next(iter(penalty)))
async def test_logit_bias_and_penalties_reach_the_engine(service, model_id, penalty):
    """The tiny random model's distribution is nearly flat: a bias of 1 makes one token win every step, and each
    penalty then stops it from repeating. OpenAI sends the bias's token ids as JSON keys."""
    client = sdk(service)
    plain = await stream_docs(service, prompt="Once upon a time", chat_template=False, max_tokens=1)
    favoured = plain[0].token_id + 1
    request = dict(model=model_id, prompt="Once upon a time", max_tokens=5, logprobs=0,
                   logit_bias={str(favoured): 1})
    biased = await client.completions.create(**request)
    assert biased.choices[0].logprobs.tokens == [biased.choices[0].logprobs.tokens[0]] * 5
    penalized = await client.completions.create(**request, extra_body=penalty)
    docs = await stream_docs(service, prompt="Once upon a time", chat_template=False, max_tokens=5,
                             logit_bias={str(favoured): 1.0}, logprobs=True, **penalty)
    assert [d.token_id for d in docs].count(favoured) == 1
    assert penalized.choices[0].logprobs.tokens == [d.token for d in docs]


REFUSED = [
    pytest.param(CHAT, {"temperature": 2.5}, "temperature", "temperature must be between 0 and 2", id="temperature"),
    pytest.param(CHAT, {"top_p": 1.2}, "top_p", "top_p must be between 0 and 1", id="top-p"),
    pytest.param(CHAT, {"presence_penalty": 3}, "presence_penalty", "between -2 and 2", id="presence"),
    pytest.param(CHAT, {"frequency_penalty": -2.5}, "frequency_penalty", "between -2 and 2", id="frequency"),
    pytest.param(CHAT, {"repetition_penalty": 0}, "repetition_penalty", "must be > 0", id="repetition"),
    pytest.param(CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20", id="top-logprobs"),
    pytest.param(CHAT, {"top_logprobs": 2}, "top_logprobs", "needs logprobs set to true", id="top-without-logprobs"),
    pytest.param(CHAT, {"logit_bias": {"hello": 5}}, "logit_bias", "keys are token ids", id="bias-key"),
    pytest.param(CHAT, {"logit_bias": {"5": 200}}, "logit_bias", "between -100 and 100", id="bias-value"),
    pytest.param(CHAT, {"logit_bias": {"99999999": 5}}, None, "token ids go from 0 to", id="bias-beyond-vocab"),
    pytest.param(CHAT, {"n": 2}, "n", "n is not supported by this service: one choice per request", id="n"),
    pytest.param(CHAT, {"function_call": "auto"}, "function_call", "send tool_choice (function_call is its deprecated",
                 id="function-call"),
    pytest.param(COMPLETIONS, {"echo": True, "logprobs": 1}, "echo", "echo with logprobs is not supported",
                 id="echo-logprobs"),
    pytest.param(COMPLETIONS, {"best_of": 3}, "best_of", "best_of is not supported", id="best-of"),
    pytest.param(COMPLETIONS, {"logprobs": 21}, "logprobs", "between 0 and 20", id="completion-logprobs"),
]


@pytest.mark.parametrize("path, fields, param, message", REFUSED)
async def test_what_the_service_does_not_do_is_a_400_that_says_so(service, path, fields, param, message):
    body = {"max_tokens": 3, **({"messages": USER} if path == CHAT else {"prompt": "hi"}), **fields}
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


async def test_harmless_fields_pass(service, model_id):
    """What changes nothing here is accepted: text format, no tool call, one choice, fields the SDKs add."""
    answer = await sdk(service).chat.completions.create(
        model=model_id, messages=[{"role": "developer", "content": "Be brief."}, *USER], max_tokens=3, n=1,
        response_format={"type": "text"}, tool_choice="none", user="someone", store=False,
    )
    assert answer.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
async def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(service, model_id, path, stream):
    """A prompt sent again finds its blocks cached, and says how many of its tokens came from there, as
    OpenAI's `usage.prompt_tokens_details.cached_tokens`."""
    client = sdk(service)
    text = f"{stream} {path}: " + " ".join(f"word{i}" for i in range(60))  # its own prompt: nothing cached yet

    async def cached_tokens() -> tuple[int, int]:
        if path == CHAT:
            create = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}],
                                                    max_tokens=2, stream=stream,
                                                    **({"stream_options": {"include_usage": True}} if stream else {}))
        else:
            create = client.completions.create(model=model_id, prompt=text, max_tokens=2, stream=stream,
                                               **({"stream_options": {"include_usage": True}} if stream else {}))
        answer = await create
        usage = [chunk async for chunk in answer][-1].usage if stream else answer.usage
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    prompt_tokens, first = await cached_tokens()
    again, second = await cached_tokens()
    assert again == prompt_tokens > 60
    assert first < 32  # at most the chat template's system turn, which every chat prompt starts with
    assert prompt_tokens - 16 <= second < prompt_tokens  # whole blocks of 16; the last token is computed
