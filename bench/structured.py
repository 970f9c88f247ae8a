"""Structured outputs' costs: `python -m bench.structured [--rounds N] [--max-tokens N]`, and a section of
`make bench`.

1. Compiling: in process, on the embedded model's tokenizer (engine/structured.py): a typical schema the first
   time and from the cache, and the slowest schemas of the size the defaults allow.
2. Decoding: the service as `make serve` runs it, 16 concurrent gRPC streams, rounds interleaved:
   - "free": 16 unconstrained streams;
   - "mixed": 8 unconstrained streams beside 8 under a JSON schema.
   The unconstrained streams' ITL in "mixed" against "free" says what the constrained rows cost their
   neighbours; the constrained streams' tokens/s against the unconstrained ones' beside them, what they cost
   themselves. A constrained stream ends when its JSON closes, so it runs fewer tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

from bench import service
from bench.load import StreamTiming, percentile, round_prompts, time_stream
from client import grpc_client, stream_documents
from engine import Constraint, ConstraintKind, EngineConfig, load_model
from engine.structured import GrammarLimits, Grammars
from schemas import ModelOutputDocument, PromptDocument

STREAMS = 16
CONSTRAINED = 8
WINDOW = 48  # tokens of each stream that its timings cover
MAX_TOKENS = 256  # room for the JSON to close
# What an application asks for: a record with strings, numbers, an enum, a list and a nested object, bounded as
# an extraction schema is (a small model asked for a story's summary writes the story otherwise).
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "author": {"type": "string", "maxLength": 80},
        "year": {"type": "integer"},
        "genre": {"enum": ["fantasy", "science fiction", "mystery", "romance", "other"]},
        "characters": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 5},
        "setting": {
            "type": "object",
            "properties": {"place": {"type": "string", "maxLength": 80}, "era": {"type": "string", "maxLength": 40}},
            "required": ["place", "era"],
            "additionalProperties": False,
        },
        "summary": {"type": "string", "maxLength": 300},
    },
    "required": ["title", "author", "year", "genre", "characters", "setting", "summary"],
    "additionalProperties": False,
}


@dataclass
class CompileTimes:
    typical_first_ms: float
    typical_cached_ms: float
    enum_ms: float  # an enum that fills the size limit
    enum_values: int
    properties_ms: float  # as many patterned properties as the size limit holds
    properties: int


def embedded_grammars() -> Grammars:
    """The engine's Grammars for the embedded model, with the default limits."""
    loaded = load_model("embedded", dtype="float32")
    config = EngineConfig()
    limits = GrammarLimits.of(config)
    return Grammars(loaded.tokenizer, loaded.model.config.vocab_size, [loaded.tokenizer.eos_token_id], limits)


def compile_times(grammars: Grammars) -> CompileTimes:
    config = EngineConfig()
    grammars.check(Constraint(ConstraintKind.REGEX, "warm"))  # the library's tokenizer, built once per engine

    def timed(value: object) -> float:
        started = time.perf_counter()
        grammars.check(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(value)))
        return (time.perf_counter() - started) * 1000

    typical_first = timed(SCHEMA)
    typical_cached = timed(SCHEMA)
    enum = filling(config.max_constraint_chars, lambda n: {"enum": [f"value-{i:05d}" for i in range(n)]})
    properties = filling(config.max_constraint_chars, lambda n: {
        "type": "object",
        "properties": {f"p{i:04d}": {"type": "string", "pattern": "[a-z]{3,30}"} for i in range(n)},
    })
    return CompileTimes(typical_first, typical_cached, timed(enum), len(enum["enum"]), timed(properties),
                        len(properties["properties"]))


def filling(limit: int, schema_of: Callable[[int], dict]) -> dict:
    """The largest schema_of(n) whose text fits in `limit` characters."""
    n = 1
    while len(json.dumps(schema_of(2 * n))) <= limit:
        n *= 2
    step = n // 2
    while step:
        if len(json.dumps(schema_of(n + step))) <= limit:
            n += step
        step //= 2
    return schema_of(n)


@dataclass
class Row:
    setting: str  # free or mixed
    streams: str  # which streams of the setting: unconstrained or constrained
    count: int
    tokens_per_stream: float
    tokens_per_s_per_stream: float  # median over streams of tokens / (last token - first token)
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    ttft_p50_ms: float | None
    valid: int | None = None  # constrained answers that parsed as JSON


def forced_share(grammars: Grammars, answers: list[list[int]]) -> tuple[int, int]:
    """(tokens the schema's grammar forced, tokens) over the constrained answers: what jump-forward decoding, which
    appends forced tokens without sampling them, would have saved at most."""
    forced = total = 0
    for token_ids in answers:
        matcher = grammars.matcher(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)))
        for token_id in token_ids:
            forced += len(matcher.native.compute_ff_tokens()) > 0
            total += 1
            matcher.accept(token_id)
    return forced, total


def open_stream(client, schema: dict | None):
    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[ModelOutputDocument]:
        document = PromptDocument(prompt=prompt, max_tokens=max_tokens, json_schema=schema)
        async for doc in stream_documents(client, document):
            yield doc

    return stream


async def recorded(open_one, prompt: str, max_tokens: int, answers: list[ModelOutputDocument]) -> StreamTiming:
    """time_stream's timing, and the stream's documents kept in `answers`."""

    async def recording(prompt: str, max_tokens: int) -> AsyncIterator[ModelOutputDocument]:
        async for doc in open_one(prompt, max_tokens):
            answers.append(doc)
            yield doc

    return await time_stream(recording, prompt, max_tokens)


def row(setting: str, streams: str, timings: list[StreamTiming], texts: list[str] | None = None) -> Row:
    # Over each stream's first WINDOW tokens, while all 16 run: the constrained ones end when their JSON closes,
    # and a batch that shrank would flatter whoever runs on.
    windows = [t.gaps_s[: WINDOW - 1] for t in timings]
    gaps = [gap for window in windows for gap in window]
    rates = [len(window) / sum(window) for window in windows if window]
    valid = None if texts is None else sum(_parses(text) for text in texts)
    return Row(
        setting,
        streams,
        len(timings),
        statistics.mean(t.tokens for t in timings),
        statistics.median(rates),
        _ms(percentile(gaps, 50)),
        _ms(percentile(gaps, 95)),
        _ms(percentile([t.ttft_s for t in timings if t.ttft_s is not None], 50)),
        valid,
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def decode_rows(grpc_port: int, rounds: int, max_tokens: int) -> tuple[list[Row], list[list[int]]]:
    """The three rows, and the constrained answers' token ids."""
    client = grpc_client("127.0.0.1", grpc_port)
    free, constrained = open_stream(client, None), open_stream(client, SCHEMA)
    alone: list[StreamTiming] = []
    beside: list[StreamTiming] = []
    under_schema: list[StreamTiming] = []
    answers: list[list[ModelOutputDocument]] = []
    for number in range(1, rounds + 1):
        prompts = [f"{p} Answer with a JSON record of the story." for p in round_prompts(STREAMS, number)]
        alone += await asyncio.gather(*(time_stream(free, p, max_tokens) for p in prompts))
        answers += [[] for _ in range(CONSTRAINED)]
        mixed = await asyncio.gather(
            *(time_stream(free, p, max_tokens) for p in prompts[CONSTRAINED:]),
            *(recorded(constrained, p, max_tokens, docs) for p, docs in zip(prompts, answers[-CONSTRAINED:])),
        )
        beside += mixed[: STREAMS - CONSTRAINED]
        under_schema += mixed[STREAMS - CONSTRAINED :]
    texts = [docs[-1].generated_text for docs in answers]
    token_ids = [[doc.token_id for doc in docs if doc.token_id >= 0] for docs in answers]
    rows = [
        row("free", "unconstrained", alone),
        row("mixed", "unconstrained", beside),
        row("mixed", "constrained", under_schema, texts),
    ]
    return rows, token_ids


def targets(compiled: CompileTimes, rows: list[Row]) -> list[dict]:
    free, beside, under_schema = rows
    neighbours = (beside.itl_p50_ms or 0) / (free.itl_p50_ms or 1)
    own = under_schema.tokens_per_s_per_stream / beside.tokens_per_s_per_stream
    return [
        {"target": "unconstrained ITL p50 beside 8 constrained streams <= 1.10x with none beside them",
         "measured": f"{neighbours:.2f}x", "passed": neighbours <= 1.10},
        {"target": "a constrained stream's tokens/s >= 0.9x an unconstrained one's",
         "measured": f"{own:.2f}x", "passed": own >= 0.9},
        {"target": "a typical schema compiles in under 50 ms",
         "measured": f"{compiled.typical_first_ms:.1f} ms", "passed": compiled.typical_first_ms < 50},
        {"target": "a repeated schema comes from the cache",
         "measured": f"{compiled.typical_cached_ms:.3f} ms", "passed": compiled.typical_cached_ms < 1},
    ]


def section(results: Results, goals: list[dict]) -> list[str]:
    compiled, rows = results.compiled, results.rows
    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "## Structured outputs (bench/structured.py)",
        "",
        f"16 concurrent gRPC streams on the service as `make serve` runs it, greedy, up to {results.max_tokens} "
        f"tokens; \"mixed\": 8 of them under a 7-field JSON schema. Rates and ITL over each stream's first "
        f"{WINDOW} tokens, while all 16 run (a constrained stream ends when its JSON closes).",
        "",
        "| setting | streams | count | tokens/stream | tok/s per stream | ITL p50 ms | ITL p95 ms | TTFT p50 ms "
        "| valid JSON |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {r.streams} | {r.count} | {r.tokens_per_stream:.1f} | {r.tokens_per_s_per_stream:.1f} "
            f"| {num(r.itl_p50_ms, 1)} | {num(r.itl_p95_ms, 1)} | {num(r.ttft_p50_ms)} "
            f"| {'-' if r.valid is None else f'{r.valid}/{r.count}'} |"
        )
    lines += [
        "",
        f"Compiling (in process, the embedded tokenizer): the schema above {compiled.typical_first_ms:.1f} ms the "
        f"first time, {compiled.typical_cached_ms:.3f} ms from the cache; at the default size limit "
        f"(`max_constraint_chars`), an enum of {compiled.enum_values} values {compiled.enum_ms:.1f} ms and "
        f"{compiled.properties} patterned properties {compiled.properties_ms:.1f} ms.",
        "",
        f"Jump-forward decoding's most: {results.forced_tokens} of the constrained answers' "
        f"{results.constrained_tokens} tokens were forced by the grammar (a step with a single allowed "
        "continuation), which it would append without a sampling step of their own.",
        "",
    ]
    lines += [f"- {'PASS' if g['passed'] else 'FAIL'}: {g['target']}: {g['measured']}" for g in goals]
    return lines


@dataclass
class Results:
    compiled: CompileTimes
    rows: list[Row]
    forced_tokens: int  # of the constrained answers' tokens, those their grammar forced
    constrained_tokens: int
    max_tokens: int


async def run(grpc_port: int, rounds: int, max_tokens: int) -> tuple[Results, list[dict]]:
    grammars = await asyncio.to_thread(embedded_grammars)
    compiled = await asyncio.to_thread(compile_times, grammars)
    rows, token_ids = await decode_rows(grpc_port, rounds, max_tokens)
    results = Results(compiled, rows, *forced_share(grammars, token_ids), max_tokens)
    return results, targets(compiled, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="room for the JSON to close")
    args = parser.parse_args(argv)
    with service.serving("service-structured", {}) as ports:
        results, goals = asyncio.run(run(ports.grpc, args.rounds, args.max_tokens))
    print("\n".join(section(results, goals)))
    print(json.dumps(asdict(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
