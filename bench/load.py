"""The load driver and its statistics: N concurrent streams, timed at the consumer.

A stream is any async iterator of items that carry generated tokens: Jina's ModelOutputDocument, the engine's
StepOutput and the ceiling's Token have a `token_id` (>= 0 for a generated token); an OpenAI chunk
(bench.openai_client.Chunk) has text. For each stream we record the time from opening it to the first token
(TTFT) and the gaps between consecutive tokens (ITL); a round's aggregate rate is every generated token of the
round over the round's wall time (first stream opened to last stream finished). Tokens are counted as the stream
reports them in its usage (`completion_tokens` of the last document or chunk) where it does: an OpenAI chunk can
hold more than one token (a character split over tokens), so counting chunks would undercount.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

# Varied prompts that make a small instruct model talk for well over 64 tokens.
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a dragon who is afraid of heights.",
    "Write a long story about two friends who build a boat and sail around the world.",
    "Write a long story about a robot learning to cook for a big family.",
    "Write a long story about a detective solving a mystery in a snowy mountain village.",
    "Write a long story about a girl who can talk to the trees in her garden.",
    "Write a long story about the first city built on the moon.",
    "Write a long story about a lost dog finding its way home across the country.",
    "Write a long, detailed essay about the history of the printing press.",
    "Write a long, detailed essay about why the ocean is salty.",
    "Explain in great detail how a steam engine works, step by step.",
    "Write a long story about a baker who discovers a magic recipe.",
    "Write a long story about a pirate crew searching for a hidden island.",
    "Write a long story about a musician who loses her hearing and keeps composing.",
    "Write a long, detailed guide to planting a vegetable garden in spring.",
    "Write a long story about a village where it never stops raining.",
]

OpenStream = Callable[[str, int], AsyncIterator]  # (prompt, max_tokens) -> stream of items with token_id or text

# Numbers every measured round, so that no prompt is ever sent twice in a run (see round_prompts).
_ROUND_NUMBERS = itertools.count(1)


@dataclass
class StreamTiming:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0  # items that carried a token
    reported_tokens: int | None = None  # the stream's own count (completion_tokens), when it gives one
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def generated(self) -> int:
        return self.tokens if self.reported_tokens is None else self.reported_tokens


@dataclass
class RoundResult:
    system: str
    streams: int
    max_tokens: int
    rounds: int
    tokens: int  # generated tokens, all rounds
    prompt_tokens: float | None  # mean per stream, as the system counted them (chat template included)
    tokens_per_s: float  # median over rounds of (tokens of the round / wall time of the round)
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    wall_s: float  # all rounds
    errors: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def carries_token(item) -> bool:
    if hasattr(item, "token_id"):
        return item.token_id is not None and item.token_id >= 0
    return bool(item.text)


async def time_stream(open_stream: OpenStream, prompt: str, max_tokens: int) -> StreamTiming:
    timing = StreamTiming()
    started = time.perf_counter()
    last = None
    try:
        async for item in open_stream(prompt, max_tokens):
            now = time.perf_counter()
            if getattr(item, "error", None):
                timing.error = str(item.error)
            if getattr(item, "completion_tokens", None) is not None:
                timing.reported_tokens, timing.prompt_tokens = item.completion_tokens, item.prompt_tokens
            if not carries_token(item):
                continue
            if last is None:
                timing.ttft_s = now - started
            else:
                timing.gaps_s.append(now - last)
            last = now
            timing.tokens += 1
    except Exception as error:  # a failed stream is counted, not fatal to the round
        timing.error = repr(error)
    return timing


def round_prompts(streams: int, number: int) -> list[str]:
    """The prompts of the run's round `number`: PROMPTS, rotated by the round, each opened by the round's number.
    llama.cpp's server keeps each slot's last prompt in its KV cache and reuses the longest common prefix of the
    next one (`cache_prompt`, on by default): the same 16 prompts in every round would let it skip nearly all of
    its prefill from the second round on, which no real traffic gives it. With the number first, what any
    system can reuse is the chat template's system turn, as the service's engine does (its shared prefix)."""
    return [f"Request {number}. {PROMPTS[(number + i) % len(PROMPTS)]}" for i in range(streams)]


async def run_round(open_stream: OpenStream, prompts: list[str], max_tokens: int) -> tuple[list[StreamTiming], float]:
    """Open a stream per prompt, all at once; returns their timings and the wall time."""
    started = time.perf_counter()
    timings = await asyncio.gather(*(time_stream(open_stream, p, max_tokens) for p in prompts))
    return list(timings), time.perf_counter() - started


async def measure(
    system: str, open_stream: OpenStream, streams: int, max_tokens: int, rounds: int, note: str = ""
) -> RoundResult:
    """`rounds` rounds of `streams` concurrent streams; latencies pooled over the rounds, rate = median round."""
    [result] = await measure_interleaved({system: open_stream}, streams, max_tokens, rounds, {system: note})
    return result


async def measure_interleaved(
    systems: dict[str, OpenStream], streams: int, max_tokens: int, rounds: int, notes: dict[str, str] | None = None
) -> list[RoundResult]:
    """Round r of every system before round r+1 of any. On a shared host the machine's speed drifts by tens of
    percent within minutes; interleaved, every system sees the same drift and the ratios between them hold."""
    runs: dict[str, list[tuple[list[StreamTiming], float]]] = {name: [] for name in systems}
    for _ in range(rounds):
        prompts = round_prompts(streams, next(_ROUND_NUMBERS))  # the same for every system in the round
        for name, open_stream in systems.items():
            runs[name].append(await run_round(open_stream, prompts, max_tokens))
    return [summarize(name, streams, max_tokens, runs[name], (notes or {}).get(name, "")) for name in systems]


def summarize(
    system: str, streams: int, max_tokens: int, runs: list[tuple[list[StreamTiming], float]], note: str
) -> RoundResult:
    all_timings = [t for timings, _ in runs for t in timings]
    rates = [sum(t.generated for t in timings) / elapsed for timings, elapsed in runs]
    prompt_tokens = [t.prompt_tokens for t in all_timings if t.prompt_tokens is not None]
    ttfts = [t.ttft_s for t in all_timings if t.ttft_s is not None]
    gaps = [g for t in all_timings for g in t.gaps_s]
    errors = [t.error for t in all_timings if t.error]
    if errors:
        note = (note + "; " if note else "") + f"first error: {errors[0][:200]}"
    return RoundResult(
        system=system,
        streams=streams,
        max_tokens=max_tokens,
        rounds=len(runs),
        tokens=sum(t.generated for t in all_timings),
        prompt_tokens=statistics.mean(prompt_tokens) if prompt_tokens else None,
        tokens_per_s=statistics.median(rates),
        ttft_p50_ms=_ms(percentile(ttfts, 50)),
        ttft_p95_ms=_ms(percentile(ttfts, 95)),
        itl_p50_ms=_ms(percentile(gaps, 50)),
        itl_p95_ms=_ms(percentile(gaps, 95)),
        wall_s=sum(elapsed for _, elapsed in runs),
        errors=len(errors),
        note=note,
    )
