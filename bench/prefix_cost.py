"""`python -m bench.prefix_cost [--skip-flows]`: what the prefix cache costs where it does not help.

1. Per block size, on SmolLM2-135M's shape in float32: a lookup of a 1000-token prompt whose blocks are all
   cached, the copy of those blocks into a row (the runner's SlotCache.allocate), and the copy of a prefilled
   row's blocks into the pool (SlotCache.store, storage touched for the first time).
2. The service as `make serve` runs it, with the cache on (its default) and off (`prefix_cache_mib: 0`), two
   flows side by side, rounds interleaved: 16 gRPC streams whose prompts share nothing but the chat template's
   system turn (bench/load.py's rounds), ITL and TTFT at the client.

Prints both tables and writes bench/prefix_cost.md; the prefill the copies replace is timed by the chat rows of
`make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench import flows, service
from bench.load import RoundResult, measure_interleaved
from engine.fast.cache import BlockPool, SlotCache
from engine.fast.step import Shape
from engine.prefix_cache import PrefixCache

OUTPUT = Path(__file__).resolve().parent / "prefix_cost.md"
SMOLLM2 = Shape(layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, eps=1e-5)
PROMPT = 1000
BUDGET_MIB = 1024
REPEATS = 5


def measure(block_size: int) -> tuple[float, float, float]:
    """Seconds: lookup, copy into a row, store from a row (best of REPEATS for the first two)."""
    cpu = torch.device("cpu")
    blocks = BUDGET_MIB * 2**20 // BlockPool.block_bytes(SMOLLM2, block_size, torch.float32)
    prefixes = PrefixCache(blocks, block_size)
    cache = SlotCache(SMOLLM2, 4, 2048, cpu, torch.float32, BlockPool(SMOLLM2, blocks, block_size, cpu, torch.float32))
    tokens = list(range(PROMPT))
    cache.reserve(PROMPT + 1)
    cache.advance(cache.allocate("prefilled"), PROMPT)
    reservation = prefixes.reserve(tokens, PROMPT)
    started = time.perf_counter()
    cache.store("prefilled", reservation.writes)
    store = time.perf_counter() - started
    prefixes.commit(reservation)
    cache.free("prefilled")
    lookups, copies = [], []
    for _ in range(REPEATS):
        started = time.perf_counter()
        chain = prefixes.lookup([*tokens, 0])
        lookups.append(time.perf_counter() - started)
        started = time.perf_counter()
        cache.allocate("hit", [block.id for block in chain])
        copies.append(time.perf_counter() - started)
        prefixes.release(chain)
        cache.free("hit")
    return min(lookups), min(copies), store


def flows_side_by_side(streams: int, max_tokens: int, rounds: int) -> list[RoundResult]:
    systems = {"cache on (default)": {}, "cache off (prefix_cache_mib: 0)": {"prefix_cache_mib": 0}}
    with ExitStack() as stack:
        opened = {
            name: flows.grpc_stream(stack.enter_context(service.serving(f"prefix-cost-{index}", overrides)).grpc)
            for index, (name, overrides) in enumerate(systems.items())
        }

        async def run() -> list[RoundResult]:
            for open_stream in opened.values():  # warm up
                async for _ in open_stream("Hello", 4):
                    pass
            return await measure_interleaved(opened, streams, max_tokens, rounds)

        return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_cost", description=__doc__)
    parser.add_argument("--skip-flows", action="store_true", help="the block sizes only")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = [
        "| block size (tokens) | lookup (ms) | copy into a row (ms) | store from a row (ms) |",
        "|---:|---:|---:|---:|",
    ]
    for block_size in (4, 8, 16, 32):
        lookup, copy, store = measure(block_size)
        rows.append(f"| {block_size} | {lookup * 1e3:.2f} | {copy * 1e3:.1f} | {store * 1e3:.1f} |")
    threads = torch.get_num_threads()
    lines = [
        "# What the prefix cache costs where it does not help (`python -m bench.prefix_cost`)",
        "",
        "## Block sizes",
        "",
        f"SmolLM2-135M's shape, float32 KV, a {PROMPT}-token prompt whose blocks are all cached, "
        f"{threads} threads, best of {REPEATS} (the store once: its storage is touched for the first time).",
        "",
        *rows,
        "",
    ]
    if not args.skip_flows:
        results = flows_side_by_side(args.streams, args.max_tokens, args.rounds)
        lines += [
            "## Decode with the cache on and off, prompts that share only the system turn",
            "",
            f"Two flows as `make serve` runs them, side by side, {args.rounds} rounds interleaved, {args.streams} "
            f"gRPC streams of {args.max_tokens} tokens (bench/load.py's prompts, never repeated).",
            "",
            "| flow | tok/s | TTFT p50 (ms) | ITL p50 (ms) | ITL p95 (ms) |",
            "|---|---:|---:|---:|---:|",
            *[
                f"| {r.system} | {r.tokens_per_s:.1f} | {r.ttft_p50_ms:.0f} | {r.itl_p50_ms:.1f} | {r.itl_p95_ms:.1f} |"
                for r in results
            ],
            "",
        ]
        on, off = results
        if on.itl_p50_ms and off.itl_p50_ms:
            lines += [f"ITL p50 with the cache on / off: {on.itl_p50_ms / off.itl_p50_ms:.3f} (target: within 5%).", ""]
    text = "\n".join(lines)
    print(text)
    OUTPUT.write_text(text)


if __name__ == "__main__":
    main()
