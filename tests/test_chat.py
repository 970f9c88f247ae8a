"""Conversations and log probabilities, as clients send and read them: `PromptDocument.messages` over real gRPC,
OpenAI chat (stream or not) and the WebSocket's per-connection history; logprobs as DocArray tensors on each
ModelOutputDocument, equal to a plain forward of the model, and in OpenAI's chat and completions shapes."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from websockets.asyncio.client import connect

from harness.http import CHAT, receive_until_end, sdk
from harness.service import seed_client_texts, stream_docs
from schemas import ChatMessage, ModelOutputDocument

CONVERSATION = [
    {"role": "system", "content": "You are a terse geography teacher."},
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of France?"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    """The tiny model as transformers runs it, in float32 as the service's flow does."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation through the model's chat template, as transformers applies it."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ])


def forward_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward at each generated position: row i scores the i-th generated token."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


# Messages ----------------------------------------------------------------------------------------------------------


async def test_grpc_messages_get_the_chat_template_turn_by_turn(tiny_service, tokenizer):
    docs = await stream_docs(tiny_service, messages=[ChatMessage(**m) for m in CONVERSATION], max_tokens=4)
    assert docs[-1].finish_reason in ("length", "eos")
    assert docs[-1].prompt_tokens == len(template_ids(tokenizer, CONVERSATION))
    # The same conversation over OpenAI chat is the same prompt: same answer, same count.
    whole = await sdk(tiny_service).chat.completions.create(model="test-model", messages=CONVERSATION, max_tokens=4)
    assert whole.usage.prompt_tokens == docs[-1].prompt_tokens
    assert whole.choices[0].message.content == docs[-1].generated_text


async def test_a_single_prompt_is_the_users_message_and_the_seed_client_still_works(tiny_service, tokenizer):
    user = [{"role": "user", "content": "hello"}]
    as_prompt = await stream_docs(tiny_service, prompt="hello", max_tokens=5)
    as_messages = await stream_docs(tiny_service, messages=user, max_tokens=5)
    assert [d.generated_text for d in as_prompt] == [d.generated_text for d in as_messages]
    assert as_prompt[-1].prompt_tokens == len(template_ids(tokenizer, user))
    assert await seed_client_texts(tiny_service, "hello", 5) == [d.generated_text for d in as_prompt]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "the prompt is empty: send some text in `prompt`, or a conversation in `messages`"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "send either `prompt` or `messages`"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "user", "content": "  "}]}, "the messages hold no text"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
         "messages[1].role is 'tool'; this model takes system, user, assistant"),
        ({"messages": [{"role": "user", "content": "hi"}], "chat_template": False}, "messages need the model's chat"),
    ],
    ids=["neither", "both", "empty", "blank", "unknown-role", "no-template"],
)
async def test_a_bad_conversation_gets_one_error_document_naming_it(tiny_service, fields, message):
    docs = await stream_docs(tiny_service, max_tokens=4, **fields)
    assert len(docs) == 1 and docs[0].finish_reason == "error" and docs[0].error_code == "invalid_request"
    assert message in docs[0].error


async def test_openai_chat_refuses_a_role_the_model_cannot_take(tiny_service):
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=60) as client:
        response = await client.post(CHAT, json={"messages": [{"role": "narrator", "content": "42"}], "max_tokens": 4})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "messages[0].role is 'narrator'; this model takes system, user, assistant" in message


async def test_websocket_keeps_the_conversation_of_its_connection(tiny_service, tokenizer):
    async with connect(f"ws://127.0.0.1:{tiny_service.http_port}/ws") as ws:
        await ws.send(json.dumps({"prompt": "What is the capital of Italy?", "max_tokens": 5,
                                  "system": "You are a terse geography teacher."}))
        first = (await receive_until_end(ws))[-1]
        await ws.send(json.dumps({"prompt": "And of France?", "max_tokens": 5}))
        second = (await receive_until_end(ws))[-1]
        history = [
            {"role": "system", "content": "You are a terse geography teacher."},
            {"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": first["text"]},
            {"role": "user", "content": "And of France?"},
        ]
        assert second["usage"]["prompt_tokens"] == len(template_ids(tokenizer, history))
        docs = await stream_docs(tiny_service, messages=history, max_tokens=5)
        assert second["text"] == docs[-1].generated_text
        # A reset starts a new conversation on the same connection.
        await ws.send(json.dumps({"type": "reset"}))
        await ws.send(json.dumps({"prompt": "And of France?", "max_tokens": 5}))
        fresh = (await receive_until_end(ws))[-1]
        assert fresh["usage"]["prompt_tokens"] == len(template_ids(tokenizer, [history[-1]]))


# Logprobs ----------------------------------------------------------------------------------------------------------


async def test_grpc_logprobs_are_tensors_equal_to_a_plain_forward(tiny_service, tokenizer, reference_model):
    docs = await stream_docs(tiny_service, prompt="Once upon a time", max_tokens=6, chat_template=False,
                             logprobs=True, top_logprobs=5, temperature=1.0, seed=3)
    prompt_ids = tokenizer("Once upon a time")["input_ids"]
    expected = forward_logprobs(reference_model, prompt_ids, [doc.token_id for doc in docs])
    for step, doc in enumerate(docs):
        assert isinstance(doc, ModelOutputDocument)
        assert doc.logprob == pytest.approx(float(expected[step, doc.token_id]), abs=1e-4)
        top = torch.topk(expected[step], 5)
        assert doc.top_token_ids.dtype == np.int64 and doc.top_logprobs.dtype == np.float32
        assert doc.top_token_ids.tolist() == top.indices.tolist()
        np.testing.assert_allclose(doc.top_logprobs, top.values.numpy(), atol=1e-4)
        assert doc.top_tokens == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert doc.token == tokenizer.decode([doc.token_id])
    plain = await stream_docs(tiny_service, prompt="Once upon a time", max_tokens=2, chat_template=False)
    assert all(doc.logprob is None and doc.top_token_ids is None for doc in plain)  # nobody asked


async def test_openai_chat_logprobs_stream_and_whole_match_the_documents(tiny_service, tokenizer):
    client = sdk(tiny_service)
    request = dict(model="test-model", messages=CONVERSATION, max_tokens=6, logprobs=True, top_logprobs=3)
    whole = await client.chat.completions.create(**request)
    chunks = [c async for c in await client.chat.completions.create(stream=True, **request)]
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    docs = await stream_docs(tiny_service, messages=CONVERSATION, max_tokens=6, logprobs=True, top_logprobs=3)
    answered = [doc for doc in docs if doc.finish_reason != "eos"]  # OpenAI never shows the end-of-sequence token
    content = whole.choices[0].logprobs.content
    assert [e.model_dump() for e in content] == [e.model_dump() for e in streamed]
    assert [e.token for e in content] == [doc.token for doc in answered]
    assert [e.logprob for e in content] == pytest.approx([doc.logprob for doc in answered], abs=1e-6)
    for entry, doc in zip(content, answered):
        assert entry.bytes == list(doc.token.encode())
        assert [t.token for t in entry.top_logprobs] == doc.top_tokens
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(doc.top_logprobs.tolist(), abs=1e-6)
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    plain = await client.chat.completions.create(model="test-model", messages=CONVERSATION, max_tokens=2)
    assert plain.choices[0].logprobs is None


async def test_openai_completions_logprobs_and_echo(tiny_service):
    client = sdk(tiny_service)
    request = dict(model="test-model", prompt="Once upon a time", max_tokens=6, logprobs=2)
    whole = await client.completions.create(**request)
    streamed = [c async for c in await client.completions.create(stream=True, **request)]
    docs = await stream_docs(tiny_service, prompt="Once upon a time", max_tokens=6, chat_template=False,
                             logprobs=True, top_logprobs=2)
    answered = [doc for doc in docs if doc.finish_reason != "eos"]
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == [doc.token for doc in answered]
    assert logprobs.token_logprobs == pytest.approx([doc.logprob for doc in answered], abs=1e-6)
    assert [list(top) for top in logprobs.top_logprobs] == [doc.top_tokens[:2] for doc in answered]
    text = whole.choices[0].text
    assert logprobs.text_offset == [len(doc.generated_text) - len(doc.text) for doc in answered]
    assert all(0 <= offset <= len(text) for offset in logprobs.text_offset)
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == logprobs.tokens
    # echo puts the prompt before the answer, in the whole text and as the stream's first chunk.
    echoed = await client.completions.create(model="test-model", prompt="Once upon a time", max_tokens=6, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + text
    chunks = [c async for c in await client.completions.create(
        model="test-model", prompt="Once upon a time", max_tokens=6, echo=True, stream=True)]
    assert chunks[0].choices[0].text == "Once upon a time"
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
