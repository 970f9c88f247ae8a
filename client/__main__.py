"""`python -m client "prompt" --max-tokens 50`: prints the answer as it streams, then a one-line summary.

Over gRPC (`stream_doc`, port 12345) by default; `--http` uses the OpenAI-compatible API instead (port 8080)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from client import StreamError, stream

GRPC_PORT, HTTP_PORT = 12345, 8080


@dataclass
class Piece:
    """What the summary needs of one streamed step, whichever transport brought it."""

    text: str
    is_token: bool
    finish_reason: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    parser.add_argument("prompt", help="the question, sent as the user's message")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="at most this many new tokens (default: %(default)s)")
    parser.add_argument("--host", default="localhost", help="the service's host (default: %(default)s)")
    parser.add_argument("--port", type=int, help=f"the service's port (default: {GRPC_PORT}, {HTTP_PORT} with --http)")
    parser.add_argument("--http", action="store_true", help="use the OpenAI-compatible HTTP API instead of gRPC")
    parser.add_argument("--system", help="a system prompt (default: none; needs the chat template)")
    parser.add_argument("--stop", action="append", help="a stop string; repeat the option for several (default: none)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this mass "
                        "(default: 1, all)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible (default: random)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="send the prompt as raw text, without the model's chat template")
    args = parser.parse_args(argv)
    if args.system is not None and args.no_chat_template:
        parser.error("--system needs the chat template: drop --no-chat-template")
    if args.port is None:
        args.port = HTTP_PORT if args.http else GRPC_PORT
    return args


async def grpc_pieces(args: argparse.Namespace, options: dict) -> AsyncIterator[Piece]:
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    prompt = [*system, {"role": "user", "content": args.prompt}] if system else args.prompt
    async for doc in stream(prompt, args.max_tokens, args.host, args.port, **options):
        yield Piece(doc.text, doc.token_id >= 0, doc.finish_reason)


async def http_pieces(args: argparse.Namespace, options: dict) -> AsyncIterator[Piece]:
    """OpenAI chat (or completions without the chat template), streamed: one chunk per piece of text."""
    body: dict = {"max_tokens": args.max_tokens, "stream": True, **options}
    body.pop("chat_template", None)
    if args.no_chat_template:
        path, body["prompt"] = "/v1/completions", args.prompt
    else:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        path, body["messages"] = "/v1/chat/completions", [*system, {"role": "user", "content": args.prompt}]
    async with (
        httpx.AsyncClient(base_url=f"http://{args.host}:{args.port}", timeout=None) as client,
        client.stream("POST", path, json=body) as response,
    ):
        if response.status_code != 200:
            error = json.loads(await response.aread()).get("error", {})
            raise StreamError("error", error.get("message"), error.get("code"))
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise StreamError("error", chunk["error"].get("message"), chunk["error"].get("code"))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                yield Piece(text or "", bool(text), choice.get("finish_reason"))


async def main(args: argparse.Namespace) -> int:
    given = {"stop": args.stop, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    options = {name: value for name, value in given.items() if value is not None}
    if args.no_chat_template:
        options["chat_template"] = False
    # Jina's client logs a failed connection as a block of its own: the one line below says it.
    os.environ.setdefault("JINA_LOG_LEVEL", "CRITICAL")
    started = time.perf_counter()
    first_token_at = None
    tokens = 0
    reason = "none"
    pieces = http_pieces(args, options) if args.http else grpc_pieces(args, options)
    try:
        async for piece in pieces:
            if piece.is_token:
                tokens += 1
                first_token_at = first_token_at or time.perf_counter()
            print(piece.text, end="", flush=True)
            reason = piece.finish_reason or reason
    except StreamError as error:
        print(f"\nthe service ended the stream with {error}", file=sys.stderr)
        return 1
    except (ConnectionError, httpx.TransportError):
        # Nothing listens there (or the connection broke): one line, not the transport's traceback.
        transport = "HTTP" if args.http else "gRPC"
        print(f"{chr(10) if tokens else ''}no service answers {transport} at {args.host}:{args.port}: is it running "
              "(make serve)?", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    ttft = (first_token_at - started) if first_token_at else float("nan")
    decode_time = elapsed - ttft if tokens > 1 else float("nan")
    rate = (tokens - 1) / decode_time if tokens > 1 else float("nan")
    # Over HTTP a token is a chunk of text (a multi-byte character held back arrives with the next one).
    print(f"\n[{tokens} tokens, time to first token {ttft * 1000:.0f} ms, {rate:.1f} tokens/s, finish: {reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
