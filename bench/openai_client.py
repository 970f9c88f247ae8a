"""Streams over the OpenAI API (`POST /v1/chat/completions`, `stream: true`), the one API both the service's
gateway and llama.cpp's server speak, for bench.load to time: every system gets the same request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from bench.load import OpenStream


@dataclass
class Chunk:
    """What a chat completion stream yields to the load driver: the text of one chunk (both servers send a chunk
    per token), the usage of the last chunk, or an error."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, those the server's prompt cache held
    error: str | None = None


def session() -> aiohttp.ClientSession:
    """One session for all of a run's streams (to be closed by the caller): concurrent streams still get a
    connection each (no limit on the pool), and later rounds reuse them, as SDK clients do."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=900))


Messages = list[dict[str, str]]
OpenConversation = Callable[[Messages, int], AsyncIterator[Chunk]]  # (messages, max_tokens) -> chunks


def chat_stream(client: aiohttp.ClientSession, port: int, model: str) -> OpenStream:
    """A stream of one user turn (the model's chat template around it), for bench.load's prompts."""
    open_conversation = conversation_stream(client, port, model)

    def open_stream(prompt: str, max_tokens: int) -> AsyncIterator[Chunk]:
        return open_conversation([{"role": "user", "content": prompt}], max_tokens)

    return open_stream


def conversation_stream(client: aiohttp.ClientSession, port: int, model: str) -> OpenConversation:
    """A stream of a whole conversation's next answer (the chat workloads resend the history each turn)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def open_stream(messages: Messages, max_tokens: int) -> AsyncIterator[Chunk]:
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,  # greedy on both servers
            "stream": True,
            "stream_options": {"include_usage": True},  # the token counts, on a last chunk
        }
        async with client.post(url, json=body) as response:
            if response.status != 200:
                yield Chunk(error=f"HTTP {response.status}: {(await response.text())[:200]}")
                return
            async for line in response.content:  # server-sent events, one `data: {json}` line per chunk
                data = line.decode().strip().removeprefix("data:").strip()
                if not line.startswith(b"data:") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    yield Chunk(error=str(chunk["error"]))
                if usage := chunk.get("usage"):
                    details = usage.get("prompt_tokens_details") or {}  # both servers send OpenAI's field
                    yield Chunk(
                        prompt_tokens=usage["prompt_tokens"],
                        completion_tokens=usage["completion_tokens"],
                        cached_tokens=details.get("cached_tokens"),
                    )
                for choice in chunk.get("choices") or []:
                    if text := (choice.get("delta") or {}).get("content"):
                        yield Chunk(text=text)

    return open_stream
