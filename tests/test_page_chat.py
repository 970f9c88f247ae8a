"""The page at `/` as a chat, in a real headless Chromium on the tiny model: the conversation goes out as
`messages` with the settings, Enter sends and Shift+Enter breaks the line, each answer shows its time to first
token and speed, and model output is rendered as markdown that cannot run script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.async_api import Page, WebSocket

from harness.browser import page_at, wait_idle
from harness.service import Service

pytestmark = pytest.mark.browser

INJECTION = (
    "Sure!\n\n<script>window.injected = 'script'</script>\n"
    '<img src="x" onerror="window.injected = \'onerror\'">\n\n'
    "[click me](javascript:window.injected='link')\n\n"
    '<a href="#" onclick="window.injected = \'onclick\'">here</a>\n\n'
    "**bold** and `code`\n\n```python\nprint('hi')\n```"
)


@pytest.fixture
async def chat_page(tiny_service: Service, tmp_path: Path):
    """The page, with the WebSocket messages it sends and those it receives."""
    sent: list[dict] = []
    received: list[dict] = []

    def record(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: received.append(json.loads(payload)))

    def record_websockets(page: Page) -> None:
        page.on("websocket", record)

    async with page_at(tiny_service.url + "/", tmp_path / "page.png", on_new_page=record_websockets) as page:
        yield page, sent, received


def first_answer(received: list[dict]) -> str:
    """The first answer's text as the service sent it (the page shows it rendered as markdown, where `\\"` reads
    `"`): the `end` message's text, or its tokens'."""
    tokens = []
    for message in received:
        if message["type"] == "token":
            tokens.append(message["text"])
        elif message["type"] == "end":
            return message.get("text", "".join(tokens))
    raise AssertionError(f"no answer ended: {received}")


async def test_the_conversation_goes_out_as_messages_with_the_settings(chat_page):
    page, sent, received = chat_page
    assert await page.is_hidden("#key-form")  # an open service asks for no key
    await page.fill("#system", "You are terse.")
    await page.fill("#temperature", "0.7")
    await page.fill("#max-tokens", "5")
    await page.click("#prompt")
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")  # a new line, not a send
    await page.keyboard.type("line two")
    assert await page.input_value("#prompt") == "line one\nline two" and sent == []
    await page.keyboard.press("Enter")
    await wait_idle(page)
    answer = first_answer(received)
    await page.fill("#prompt", "and then?")
    await page.keyboard.press("Enter")
    await wait_idle(page)
    assert [frame["messages"] for frame in sent] == [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "line one\nline two"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "line one\nline two"},
         {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}],
    ]
    assert {(frame["temperature"], frame["max_tokens"]) for frame in sent} == {(0.7, 5)}
    assert await page.locator(".turn.user").all_text_contents() == ["line one\nline two", "and then?"]
    stats = await page.locator(".stats").all_text_contents()
    assert len(stats) == 2 and all("first token" in s and "tokens/s" in s for s in stats)
    # New chat forgets the conversation.
    await page.click("#new-chat")
    await page.fill("#prompt", "hello")
    await page.keyboard.press("Enter")
    await wait_idle(page)
    assert sent[-1]["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}
    ]


async def test_model_output_is_markdown_that_cannot_run_script(chat_page):
    page, _, _ = chat_page
    # The answer arrives through the page's own message handling, as the WebSocket would deliver it.
    await page.evaluate(
        """(text) => {
            pending = {question: "q", element: addTurn("assistant", ""), text: "", tokens: 0,
                       sentAt: performance.now(), firstTokenAt: null};
            pending.element.id = "injected-answer";
            for (const piece of text.match(/[\\s\\S]{1,7}/g)) onMessage({type: "token", text: piece});
            onMessage({type: "end", finish_reason: "length", text, usage: {completion_tokens: 9}});
        }""",
        INJECTION,
    )
    answer = page.locator("#injected-answer")
    await page.click("#injected-answer a >> nth=0", no_wait_after=True)
    assert await page.evaluate("window.injected") is None
    assert await answer.locator("script, [onerror], [onclick], a[href^='javascript']").count() == 0
    assert await answer.locator("strong").text_content() == "bold"
    assert await answer.locator("pre code").text_content() == "print('hi')\n"
    assert "Sure!" in await answer.text_content()
