"""`python -m bench.slow_body PORT [--connections 100]`: issue 25's slow-body attack on a gateway's HTTP port on this
machine until this process's standard input closes; it prints `attacking` once every connection has sent its head,
and at the end one line of JSON: how the server ended the connections (the status of its answer) and how long each
lasted.

Each connection sends a request head announcing a large body to `POST /v1/completions`, then the body a byte a
second; when the server ends it, a new one. In a process of its own, as the attack's clients are: the soak's event
loop, which times a normal client's requests meanwhile (bench/soak.py), runs nothing of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

SLOW_BODY_LENGTH = 100_000  # announced in the head; at a byte a second the body would take more than a day
HEAD = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {SLOW_BODY_LENGTH}\r\n\r\n").encode()


async def slow_body_connection(
    port: int, stop: asyncio.Event, opened_once: asyncio.Event, ends: Counter, lifetimes: list[float]
) -> None:
    """One attacker, as issue 25 tried it: a request head announcing a large body, then a byte a second; when the
    server ends the connection, a new one, until `stop`. `opened_once` is set once the first head is sent (or the
    first connection refused), `ends` counts how the server ended them (by the status line of its answer),
    `lifetimes` how long each lasted."""
    while not stop.is_set():
        opened = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as error:
            ends[f"connect failed: {type(error).__name__}"] += 1
            opened_once.set()
            await asyncio.sleep(1)
            continue
        answer = asyncio.create_task(reader.readline())  # the status line, once the server answers
        try:
            writer.write(HEAD)
            opened_once.set()
            while not stop.is_set() and not answer.done():
                writer.write(b" ")
                await writer.drain()
                await asyncio.wait([answer], timeout=1.0)
            if answer.done():
                status = answer.result().split()
                ends[status[1].decode() if len(status) > 1 else "closed without an answer"] += 1
                lifetimes.append(time.monotonic() - opened)
        except ConnectionError:
            ends["reset"] += 1
            lifetimes.append(time.monotonic() - opened)
        finally:
            answer.cancel()
            writer.close()


async def attack(port: int, connections: int) -> dict:
    """`connections` attackers until standard input closes; what the module's docstring says it prints."""
    stop, ends, lifetimes = asyncio.Event(), Counter[str](), []
    opened = [asyncio.Event() for _ in range(connections)]
    tasks = [asyncio.create_task(slow_body_connection(port, stop, event, ends, lifetimes)) for event in opened]
    await asyncio.gather(*(event.wait() for event in opened))
    print("attacking", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the soak closes it
    stop.set()
    await asyncio.gather(*tasks)
    return {"ended_by": dict(ends.most_common()), "lifetimes_s": [round(s, 3) for s in lifetimes]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_body", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="the gateway's HTTP port on 127.0.0.1")
    parser.add_argument("--connections", type=int, default=100)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(attack(args.port, args.connections))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
