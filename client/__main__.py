"""`python -m client "prompt" --max-tokens 50`: prints the answer as it streams, then a one-line summary."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from client import StreamError, stream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=12345)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    given = {"stop": args.stop, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    options = {name: value for name, value in given.items() if value is not None}
    if args.no_chat_template:
        options["chat_template"] = False
    started = time.perf_counter()
    first_token_at = None
    tokens = 0
    last = None
    try:
        async for doc in stream(args.prompt, args.max_tokens, args.host, args.port, **options):
            if doc.token_id >= 0:
                tokens += 1
                first_token_at = first_token_at or time.perf_counter()
            print(doc.text, end="", flush=True)
            last = doc
    except StreamError as error:
        print(f"\nthe service ended the stream with {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    ttft = (first_token_at - started) if first_token_at else float("nan")
    decode_time = elapsed - ttft if tokens > 1 else float("nan")
    rate = (tokens - 1) / decode_time if tokens > 1 else float("nan")
    reason = last.finish_reason if last else "none"
    print(f"\n[{tokens} tokens, time to first token {ttft * 1000:.0f} ms, {rate:.1f} tokens/s, finish: {reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
