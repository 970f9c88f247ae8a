"""End to end on the embedded SmolLM2 model through the real flow, as a user runs it."""

import pytest
from docarray import DocList
from transformers import AutoTokenizer

from harness.service import FRANCE, grpc_client, seed_client_texts, stream_docs
from schemas import ModelOutputDocument, PromptDocument

pytestmark = pytest.mark.e2e


async def test_seed_tutorial_client_gets_paris(embedded_service):
    texts = await seed_client_texts(embedded_service, FRANCE, max_tokens=10)
    assert texts[-1] == "The capital of France is Paris."
    assert len(texts) >= 7  # one document per token, not one at the end
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert len(set(texts)) >= 7  # the text grows step by step


async def test_stream_equals_unary(embedded_service):
    prompt = PromptDocument(prompt="Name three rivers in Europe.", max_tokens=40)
    docs = await stream_docs(embedded_service, prompt=prompt.prompt, max_tokens=prompt.max_tokens)
    unary = DocList[ModelOutputDocument]()
    async for response in grpc_client(embedded_service.grpc_port).post(
        on="/generate", inputs=DocList[PromptDocument]([prompt]), return_type=DocList[ModelOutputDocument]
    ):
        unary.extend(response)
    assert unary[0].generated_text == docs[-1].generated_text == "".join(d.text for d in docs)


@pytest.mark.parametrize(
    "prompt",
    [
        "Translate to Chinese: I love my family and good food.",
        "Write a birthday message with emoji 🎉🎂.",
        "Write a French sentence with the words café, crème brûlée and très.",
    ],
)
async def test_multilingual_output_streams_whole_characters(embedded_service, embedded_dir, prompt):
    docs = await stream_docs(embedded_service, prompt=prompt, max_tokens=48)
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    token_ids = [d.token_id for d in docs if d.token_id >= 0]
    assert "".join(d.text for d in docs) == docs[-1].generated_text
    assert docs[-1].generated_text == tokenizer.decode(token_ids, skip_special_tokens=True)
    for doc in docs[:-1]:  # no broken character at any step boundary
        assert "\ufffd" not in doc.generated_text
    assert any(ord(c) > 127 for c in docs[-1].generated_text), docs[-1].generated_text
