"""Clients of the service's HTTP side: the official OpenAI SDK pointed at it, the OpenAI routes, and the
WebSocket chat's messages of one answer."""

from __future__ import annotations

import asyncio
import json

import openai

from harness.service import Service

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]  # the shortest valid conversation


def sdk(service: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key="not-needed", max_retries=0)


async def receive_until_end(ws) -> list[dict]:
    """The WebSocket's messages of one answer, up to its end or error message (60 s at most each)."""
    messages = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 60))
        messages.append(message)
        if message["type"] in ("end", "error"):
            return messages
