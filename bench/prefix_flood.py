"""`python -m bench.prefix_flood [--requests 300] [--prefix-cache-mib 64]`: issue 22's fault case. A flood of
prompts that share nothing, each long enough to fill blocks of the prefix cache, must neither grow the executor's
memory past the cache's budget nor slow the other streams more than 10% beyond what the same flood costs them
with the cache off.

Two flows of the embedded model side by side, `make serve`'s settings but for the cache: one with a budget small
enough that the flood evicts all the time (`--prefix-cache-mib`), one with the cache off. On each in turn, in
`--rounds` alternating rounds:
`--victims` long greedy gRPC streams run while `--requests` prompts of about `--prefix-tokens` distinct tokens
(1 new token each, `--concurrency` at a time) go through the OpenAI API. Reported: the victims' ITL p50/p95 on
each flow and their ratio, the cache's bytes (its gauge, sampled) against the budget, its evictions, and the
executor's RSS before and after. Results in bench/prefix_flood.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench import flows
from bench.load import percentile, time_stream
from harness.processes import process_listening_on
from harness.service import Service, serve

OUTPUT = Path(__file__).resolve().parent / "prefix_flood.md"
ITL_TARGET = 1.10  # issue 22: other streams' ITL at most 10% slower
WORDS = ["river", "stone", "maple", "copper", "lantern", "violet", "harbor", "meadow", "thunder", "silver",
         "orchard", "canyon", "ember", "glacier", "falcon", "willow", "prism", "cobalt", "saffron", "tundra"]


def distinct_prompt(number: int, words: int) -> str:
    """A prompt no other shares beyond its first word: its number opens it, seeded words follow."""
    rng = random.Random(number)
    return f"Document {number}: " + " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class FloodResult:
    cache: str  # "on (N MiB)" or "off"
    requests: int
    flood_s: float
    victim_itl_p50_ms: float | None
    victim_itl_p95_ms: float | None
    victim_tokens: int
    cache_bytes_max: float  # the llm_prefix_cache_bytes gauge, its largest sample
    evictions: float
    executor_rss_mib_before: float
    executor_rss_mib_after: float
    errors: int


async def flood(service: Service, args: argparse.Namespace, first: int) -> tuple[float, int]:
    """The flood's requests, `args.concurrency` at a time; returns its wall time and its errors."""
    numbers = iter(range(first, first + args.requests))
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for number in numbers:
            body = {"model": "test-model", "prompt": distinct_prompt(number, args.prefix_tokens), "max_tokens": 1}
            response = await client.post("/v1/completions", json=body)
            errors += response.status_code != 200

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=service.url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    return time.perf_counter() - started, errors


async def sample_cache_bytes(service: Service, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(await asyncio.to_thread(service.metric, "llm_prefix_cache_bytes"))
        await asyncio.sleep(0.5)


async def measure(service: Service, label: str, args: argparse.Namespace, first: int) -> FloodResult:
    executor = process_listening_on(service.monitoring_port)
    rss_before = executor.memory_info().rss / 2**20
    open_stream = flows.grpc_stream(service.grpc_port)
    samples: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_cache_bytes(service, samples, stop))
    # The victims start first and run past the flood's end: their gaps are measured while it runs.
    victims = [asyncio.create_task(time_stream(open_stream, f"Victim {i}. Write a long story about a lighthouse.",
                                               args.victim_tokens)) for i in range(args.victims)]
    await asyncio.sleep(2)
    flood_started = time.perf_counter()
    flood_s, errors = await flood(service, args, first)
    timings = await asyncio.gather(*victims)
    stop.set()
    await sampler
    # Only the gaps that fell inside the flood: a victim's timing holds its gaps in order from its first token.
    gaps = []
    for timing in timings:
        at = flood_started - 2 + (timing.ttft_s or 0)
        for gap in timing.gaps_s:
            at += gap
            if flood_started <= at <= flood_started + flood_s:
                gaps.append(gap)
    return FloodResult(
        label,
        args.requests,
        flood_s,
        None if not gaps else percentile(gaps, 50) * 1000,
        None if not gaps else percentile(gaps, 95) * 1000,
        sum(t.tokens for t in timings),
        max(samples, default=0.0),
        service.metric("llm_prefix_cache_evictions_total"),
        rss_before,
        executor.memory_info().rss / 2**20,
        errors + sum(t.error is not None for t in timings),
    )


def markdown(results: list[FloodResult], args: argparse.Namespace, command: str) -> str:
    on, off = results
    ratio = (on.victim_itl_p50_ms or 0) / (off.victim_itl_p50_ms or 1)
    budget = args.prefix_cache_mib * 2**20
    lines = [
        f"# Prefix cache under a flood of distinct prompts: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"{args.requests} prompts per flow of about {args.prefix_tokens} words each, sharing nothing, "
        f"{args.concurrency} at a time through `/v1/completions` (1 token each), in {args.rounds} rounds alternating "
        f"between the flows, while {args.victims} greedy gRPC streams run; the victims' gaps counted are those that "
        "fell within the flood (latencies: the median over rounds).",
        "",
        "| cache | flood s | victims' ITL p50 ms | p95 ms | cache bytes (max sampled) | evictions "
        "| executor RSS MiB before -> after | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.cache} | {r.flood_s:.1f} | {r.victim_itl_p50_ms or 0:.1f} | {r.victim_itl_p95_ms or 0:.1f} "
            f"| {r.cache_bytes_max / 2**20:.1f} MiB | {r.evictions:.0f} "
            f"| {r.executor_rss_mib_before:.0f} -> {r.executor_rss_mib_after:.0f} | {r.errors} |"
        )
    lines += [
        "",
        f"- {'PASS' if ratio <= ITL_TARGET else 'FAIL'}: the victims' ITL p50 with the cache on, over it off: "
        f"{ratio:.2f}x (target <= {ITL_TARGET}x)",
        f"- {'PASS' if on.cache_bytes_max <= budget else 'FAIL'}: the cache's bytes stay within its budget: "
        f"{on.cache_bytes_max / 2**20:.1f} of {args.prefix_cache_mib} MiB",
        "",
        "```json",
        json.dumps([asdict(r) for r in results], indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="per flow, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=300, help="words per prompt (about as many tokens)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--victims", type=int, default=4)
    parser.add_argument("--victim-tokens", type=int, default=1000)
    parser.add_argument("--prefix-cache-mib", type=int, default=64)
    args = parser.parse_args(argv)
    command = "python -m bench.prefix_flood" + ("" if len(sys.argv) <= 1 else " " + " ".join(sys.argv[1:]))
    settings = {f"on ({args.prefix_cache_mib} MiB)": args.prefix_cache_mib, "off": 0}
    with contextlib.ExitStack() as stack:
        services = {label: stack.enter_context(serve(flows.LogDirs(), f"prefix-flood-{mib}",
                                                     {"model": "embedded", "prefix_cache_mib": mib}))
                    for label, mib in settings.items()}
        # Rounds alternate between the flows: a shared machine's speed drifts, and both see the same drift.
        per_round = argparse.Namespace(**{**vars(args), "requests": args.requests // args.rounds})
        rounds: dict[str, list[FloodResult]] = {label: [] for label in services}
        for number in range(args.rounds):
            for label, service in services.items():
                rounds[label].append(asyncio.run(measure(service, label, per_round, first=number * args.requests)))
    results = [pooled(label, measured) for label, measured in rounds.items()]
    text = markdown(results, args, command)
    OUTPUT.write_text(text)
    print(text)
    return 0


def pooled(label: str, rounds: list[FloodResult]) -> FloodResult:
    """The rounds of one flow as one result: latencies by their median over rounds, the rest summed or the
    extremes."""
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return FloodResult(
        label,
        sum(r.requests for r in rounds),
        sum(r.flood_s for r in rounds),
        median([r.victim_itl_p50_ms for r in rounds]),
        median([r.victim_itl_p95_ms for r in rounds]),
        sum(r.victim_tokens for r in rounds),
        max(r.cache_bytes_max for r in rounds),
        rounds[-1].evictions,
        rounds[0].executor_rss_mib_before,
        rounds[-1].executor_rss_mib_after,
        sum(r.errors for r in rounds),
    )


if __name__ == "__main__":
    sys.exit(main())
