"""`python -m bench.prefix_blocks`: what the prefix cache's block size costs, on SmolLM2-135M's shape in float32.

For each block size: a lookup of a 1000-token prompt whose blocks are all cached, the copy of those blocks into a
row (the runner's SlotCache.allocate), and the copy of a prefilled row's blocks into the pool (SlotCache.store,
storage touched for the first time). Prints a table and writes bench/prefix_blocks.md; the prefill those copies
replace is timed by `python -m bench.trace` and the chat rows of `make bench`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.fast.cache import BlockPool, SlotCache
from engine.fast.step import Shape
from engine.prefix_cache import PrefixCache

OUTPUT = Path(__file__).resolve().parent / "prefix_blocks.md"
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


def main() -> None:
    torch.set_grad_enabled(False)
    rows = [
        "| block size (tokens) | lookup (ms) | copy into a row (ms) | store from a row (ms) |",
        "|---:|---:|---:|---:|",
    ]
    for block_size in (4, 8, 16, 32):
        lookup, copy, store = measure(block_size)
        rows.append(f"| {block_size} | {lookup * 1e3:.2f} | {copy * 1e3:.1f} | {store * 1e3:.1f} |")
    threads = torch.get_num_threads()
    text = "\n".join(
        [
            "# Prefix cache block sizes (`python -m bench.prefix_blocks`)",
            "",
            f"SmolLM2-135M's shape, float32 KV, a {PROMPT}-token prompt whose blocks are all cached, "
            f"{threads} threads, best of {REPEATS} (the store once: its storage is touched for the first time).",
            "",
            *rows,
            "",
        ]
    )
    print(text)
    OUTPUT.write_text(text)


if __name__ == "__main__":
    main()
