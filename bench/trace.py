"""`python -m bench.trace [--streams 16] [--spread-ms 0] [--prefill-chunk 192]`: where a burst's time to first
token goes.

N chat prompts (the bench's: bench.load.round_prompts) arrive at the engine (in process, no Jina) spread evenly
over --spread-ms; every forward the engine runs is timed, and the timeline is printed and written to
bench/trace.md:

    prefill 8x23 @ 95 ms: 247 ms      a batched prefill of 8 prompts, 23 tokens wide, started 95 ms in
    decode 16x1 @ 610 ms: 57 ms       one decode step of 16 rows
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench import ceiling
from bench.load import round_prompts
from engine import SamplingParams, load_model
from engine.config import EngineConfig

OUTPUT = Path(__file__).resolve().parent / "trace.md"


@dataclass
class Forward:
    kind: str
    rows: int
    width: int
    started_s: float
    took_s: float


def record_forwards(engine, timeline: list[Forward]) -> None:
    """Wrap the engine's runner so that every prefill and decode forward lands in `timeline`."""
    runner = engine.runner
    prefill, decode = runner.prefill, runner.decode

    def timed(kind: str, rows: int, width: int, forward, *args):
        started = time.perf_counter()
        result = forward(*args)
        timeline.append(Forward(kind, rows, width, started, time.perf_counter() - started))
        return result

    runner.prefill = lambda plan: timed(
        "prefill", len(plan.chunks), max(len(c.token_ids) for c in plan.chunks), prefill, plan
    )
    runner.decode = lambda request_ids, input_ids: timed("decode", len(request_ids), 1, decode, request_ids, input_ids)


async def first_token_s(engine, prompt: str, delay_s: float, max_tokens: int) -> float:
    """Time from arrival to the first token; the stream then runs to its end, as a client's would (its decode
    steps share the engine with the prefills still to come)."""
    await asyncio.sleep(delay_s)
    prompt_ids = engine.processor.tokenize(prompt, True)
    started = time.perf_counter()
    first: float | None = None
    async for output in engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens)):
        if output.error:
            raise RuntimeError(f"{prompt!r} failed: {output.error}")
        if first is None and output.token_id >= 0:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"no token for {prompt!r}")
    return first


async def burst(engine, prompts: list[str], spread_s: float, max_tokens: int, timeline: list[Forward]) -> list[str]:
    timeline.clear()
    started = time.perf_counter()
    streams = len(prompts)
    delays = [spread_s * i / max(1, streams - 1) for i in range(streams)]
    ttfts = await asyncio.gather(*(first_token_s(engine, prompt, d, max_tokens) for prompt, d in zip(prompts, delays)))
    lines = [f"{streams} arrivals over {spread_s * 1000:.0f} ms: TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms, "
             f"mean {statistics.mean(ttfts) * 1000:.0f} ms, max {max(ttfts) * 1000:.0f} ms (from each arrival)"]
    first_tokens_by = started + max(delays) + max(ttfts)
    lines += [f"    {f.kind} {f.rows}x{f.width} @ {(f.started_s - started) * 1000:.0f} ms: {f.took_s * 1000:.0f} ms"
              for f in timeline if f.started_s < first_tokens_by]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--spread-ms", type=float, nargs="+", default=[0, 150])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each stream runs for (the bench's 64)")
    parser.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    parser.add_argument("--quantization", default=EngineConfig.quantization)
    args = parser.parse_args()
    loaded = load_model("embedded")
    engine = ceiling.start_engine(loaded, prefill_chunk=args.prefill_chunk, quantization=args.quantization)
    timeline: list[Forward] = []
    record_forwards(engine, timeline)
    lines = [
        f"# Burst trace: `python -m bench.trace` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{loaded.device}, prefill_chunk {engine.config.prefill_chunk}, "
        f"max_decode_pause_s {engine.config.max_decode_pause_s})",
        "",
        f"Runner: {engine.runner.describe()}",
        "",
        "```",
    ]
    try:
        for number in range(args.repeat):
            for spread_ms in args.spread_ms:
                prompts = round_prompts(args.streams, number)
                lines += asyncio.run(burst(engine, prompts, spread_ms / 1000, args.max_tokens, timeline))
    finally:
        engine.close()
    lines += ["```", ""]
    print("\n".join(lines))
    OUTPUT.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
