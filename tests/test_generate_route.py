"""`POST /generate` (gateway/unary.py) on the real flow of the tiny model: the same answers as the streams, Jina's
HTTP client unchanged, a limit on documents per call, the engine's admission, and the client leaving cancels every
generation of the call."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

from gateway.unary import DEFAULT_MAX_GENERATE_DOCUMENTS
from harness import ROOT
from harness.service import TINY_LIMITS, eventually, idle, stream_docs

LONG = 480  # max_tokens for generations still running when the client leaves
PROMPTS = ["first unary question", "second unary question"]


async def post_generate(service, body) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
        return await client.post("/generate", json=body)


async def test_each_document_gets_the_last_document_of_its_stream(tiny_service):
    await idle(tiny_service)
    response = await post_generate(tiny_service, {"data": [{"prompt": p, "max_tokens": 6} for p in PROMPTS]})
    assert response.status_code == 200, response.text
    answers = response.json()["data"]
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        streamed = (await stream_docs(tiny_service, prompt=prompt, max_tokens=6))[-1]
        assert answer["generated_text"] == streamed.generated_text
        assert answer["finish_reason"] == streamed.finish_reason and answer["completion_tokens"] == 6


# In a process of its own: Jina's HTTP client reconfigures logging, which later tests that read the log would feel.
JINA_HTTP_CLIENT = """
import json, sys
from docarray import DocList
from jina import Client
from schemas import ModelOutputDocument, PromptDocument
client = Client(host="127.0.0.1", port=int(sys.argv[1]), protocol="http")
inputs = DocList[PromptDocument]([PromptDocument(prompt=sys.argv[2], max_tokens=6)])
docs = client.post(on="/generate", inputs=inputs, return_type=DocList[ModelOutputDocument])
print(json.dumps([doc.generated_text for doc in docs]))
"""


async def test_jinas_http_client_posts_to_generate_unchanged(tiny_service):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", JINA_HTTP_CLIENT, str(tiny_service.http_port), PROMPTS[0],
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, output.decode()[-2000:]
    streamed = (await stream_docs(tiny_service, prompt=PROMPTS[0], max_tokens=6))[-1]
    assert json.loads(output.decode().splitlines()[-1]) == [streamed.generated_text]


async def test_a_call_past_the_document_limit_is_refused_naming_it(tiny_service):
    documents = [{"prompt": "hi", "max_tokens": 2}] * 40
    response = await post_generate(tiny_service, {"data": documents})
    assert response.status_code == 400
    error = response.json()["error"]
    assert f"at most {DEFAULT_MAX_GENERATE_DOCUMENTS} documents (max_generate_documents), got 40" in error["message"]
    assert error["param"] == "data"


async def test_a_bad_document_is_refused_naming_it(tiny_service):
    for document, named in (({"prompt": "hi"}, "`data[1]` is not a valid PromptDocument"),
                            ({"prompt": "", "max_tokens": 3}, "data[1]: the prompt is empty")):
        response = await post_generate(tiny_service, {"data": [{"prompt": "hi", "max_tokens": 2}, document]})
        assert response.status_code == 400, response.text
        assert named in response.json()["error"]["message"]


async def test_a_call_that_does_not_fit_the_engine_gets_429_and_leaves_nothing_running(tiny_service):
    await idle(tiny_service)
    cancelled = tiny_service.cancelled_requests()
    fits = TINY_LIMITS["max_running"] + TINY_LIMITS["max_waiting"]  # 6 of the call's 7 documents are admitted
    response = await post_generate(tiny_service, {"data": [{"prompt": "hi", "max_tokens": LONG}] * (fits + 1)})
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"]
    error = response.json()["error"]
    assert error["code"] == "overloaded" and "the service is overloaded" in error["message"]
    # The call's admitted documents are cancelled with it, and the service serves the next call.
    await idle(tiny_service)
    assert tiny_service.cancelled_requests() == cancelled + fits
    response = await post_generate(tiny_service, {"data": [{"prompt": "hi", "max_tokens": 2}]})
    assert response.status_code == 200 and response.json()["data"][0]["completion_tokens"] == 2


async def test_a_client_that_leaves_cancels_every_generation_of_the_call(tiny_service):
    await idle(tiny_service)
    cancelled = tiny_service.cancelled_requests()
    body = {"data": [{"prompt": f"tell me everything {n}", "max_tokens": LONG} for n in range(3)]}
    async with httpx.AsyncClient(base_url=tiny_service.url, timeout=120) as client:
        call = asyncio.create_task(client.post("/generate", json=body))
        await eventually(lambda: tiny_service.running_streams() == 3)
        call.cancel()  # closes the connection
        await asyncio.gather(call, return_exceptions=True)
    await idle(tiny_service)
    assert tiny_service.cancelled_requests() == cancelled + 3
