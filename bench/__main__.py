"""`make bench` / `python -m bench [--quick] [--device cuda] [--dtype float32]`.

In one run, on the embedded SmolLM2-135M-Instruct, chat template on, greedy, varied "write a long story" prompts:

1. side by side, rounds interleaved: in process without Jina, the single-stream KV-cache loop (the ceiling)
   and LLMEngine alone; the service, the project's executor (config.yml) in a real `jina flow`, N concurrent
   gRPC `stream_doc`s;
2. the seed tutorial's design (bench/seed_executor.py) in its own real flow, the baseline.

Prints a markdown table, writes BENCHMARKS.md and bench/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import ceiling, flows, report
from bench.load import RoundResult, measure, measure_interleaved
from engine import load_model

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 streams, 16 tokens, 1 round")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (the executors' uses_with)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (the executors' uses_with)")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent streams per round (default 1 4 16 32)")
    parser.add_argument("--max-tokens", type=int, help="new tokens per stream (default 64)")
    parser.add_argument("--rounds", type=int, help="rounds per setting (default 5)")
    parser.add_argument("--seed-streams", type=int, nargs="+", help="streams for the seed baseline (default 1 16)")
    parser.add_argument("--seed-budget-s", type=float, default=600,
                        help="the seed baseline serializes streams; fewer streams are run where the projected time exceeds this")
    parser.add_argument("--skip-seed", action="store_true", help="leave the seed baseline out")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)
    args.streams = args.streams or ([1, 4] if args.quick else [1, 4, 16, 32])
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seed_streams = args.seed_streams or ([1, 4] if args.quick else [1, 16])
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def warm_up(open_stream) -> None:
    async for _ in open_stream("Hello", 4):
        pass


async def side_by_side(loaded, open_ceiling, port: int, args) -> list[RoundResult]:
    """The ceiling, the engine in process and the service, each setting's rounds interleaved across them."""
    engine = ceiling.start_engine(loaded)
    systems = {
        report.CEILING: open_ceiling,
        report.ENGINE: ceiling.engine_stream(engine),
        report.SERVICE: flows.grpc_stream(port),
    }
    results: list[RoundResult] = []
    try:
        for open_stream in systems.values():
            await warm_up(open_stream)
        for n in args.streams:
            compared = list(systems) if n == 1 else [report.ENGINE, report.SERVICE]  # the ceiling is one stream
            log(f"{n} streams: {', '.join(compared)}, rounds interleaved")
            results += await measure_interleaved(
                {name: systems[name] for name in compared}, n, args.max_tokens, args.rounds,
                notes={report.CEILING: "greedy, EOS ignored"},
            )
    finally:
        engine.close()
    return sorted(results, key=lambda r: (list(systems).index(r.system), r.streams))


async def seed_baseline(port: int, args) -> list[RoundResult]:
    """One round per setting; a setting is shrunk to fit --seed-budget-s, and the table says so."""
    open_stream = flows.grpc_stream(port)
    await warm_up(open_stream)
    results: list[RoundResult] = []
    for n in args.seed_streams:
        note = "one generate(max_new_tokens=1) per token, no KV cache, blocks the event loop"
        run_n = n
        if results:  # streams are served one after another: time grows linearly with N
            per_stream = results[0].wall_s / results[0].streams
            fits = max(2, math.floor(args.seed_budget_s / per_stream))
            if fits < n:
                run_n = fits
                note += f"; ran {fits} streams instead of {n} to stay within {args.seed_budget_s:.0f} s"
        log(f"{report.SEED}, {run_n} streams")
        results.append(await measure(report.SEED, open_stream, run_n, args.max_tokens, 1, note=note))
    return results


NOTES = [
    "Every system gets the same varied prompts (`bench/load.py`: 'Write a long story about ...'), the chat template, "
    "greedy decoding and at most `max_tokens` new tokens; streams of the service and the engine end early only at EOS.",
    "TTFT: from opening the stream (the client's `stream_doc` call) to the first document that carries a token. "
    "ITL: gaps between consecutive token documents of a stream, pooled over all streams and rounds. "
    "Aggregate tok/s: generated tokens of a round / wall time of the round (first stream opened to last one "
    "finished), median over the rounds. All are measured at the client.",
    "The service and the seed baseline each run in their own real `jina flow` (plain gRPC gateway, one executor, "
    "its own process group), driven over gRPC from the benchmark process: each stream is its own `stream_doc` call "
    "on its own gRPC channel (one `jina.Client` holds the settings, built before the round: building one per "
    "stream costs 15-20 ms of Python each, which in one process would delay the 16th stream's start by 200 ms). "
    "On a CPU-only machine the client, the gateway and the executor share the same cores.",
    "The in-process KV-cache loop is the single-stream ceiling: prefill (logits of the last position only), then "
    "`model(input_ids=last, past_key_values=cache, use_cache=True)` per token, greedy, no Jina, no detokenization, "
    "in a process of its own, tokens sent back over a pipe (a second thread doing torch work beside the engine's "
    "in one process measured 57 -> 70 ms per token for both). "
    "LLMEngine in-process is the service's engine with the same limits, no Jina: the service minus the engine "
    "is Jina's per-document cost (gateway hop, gRPC, DocArray serialization).",
    "The ceiling, the engine and the service run side by side, rounds interleaved (round r of each before round "
    "r+1 of any; the idle systems wait while one runs): this shared host's speed drifts by tens "
    "of percent within minutes (the same ceiling measured 18.8 to 26.6 tok/s in one hour), and interleaving "
    "gives every system the same drift.",
    "The seed baseline (`bench/seed_executor.py`) is the seed tutorial's design: per token, "
    "`model.generate(**inputs, max_new_tokens=1)` over the whole sequence so far, one document per token. "
    "`generate` blocks the executor's event loop, so concurrent streams are served one step at a time, in turn.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    command = "python -m bench" + ("" if len(sys.argv) <= 1 else " " + " ".join(sys.argv[1:]))
    loaded = load_model("embedded", device=args.device, dtype=args.dtype)
    info = report.machine(loaded.device, loaded.dtype)
    log(f"model on {loaded.device} ({loaded.dtype}); streams {args.streams}, {args.max_tokens} tokens, {args.rounds} rounds")

    log("starting the ceiling's process and the service flow")
    with (
        ceiling.kv_cache_process("embedded", args.device, args.dtype) as open_ceiling,
        flows.serving("service", flows.service_executor(args.device, args.dtype)) as port,
    ):
        results = asyncio.run(side_by_side(loaded, open_ceiling, port, args))
    if not args.skip_seed:
        log("starting the seed baseline flow")
        with flows.serving("seed", flows.seed_executor(args.device, args.dtype)) as port:
            results += asyncio.run(seed_baseline(port, args))

    info["load_average_at_end"] = os.getloadavg()
    goals = report.targets(results)
    date = started.strftime("%Y-%m-%d %H:%M UTC")
    text = report.markdown(date, command, info, results, goals, NOTES, args.quick)
    print(report.table(results))
    print()
    print("\n".join(f"{'PASS' if g['passed'] else 'n/a' if g['passed'] is None else 'FAIL'}: {g['target']}: {g['measured']}" for g in goals))
    args.output.write_text(text)
    args.json.write_text(json.dumps(
        {"date": date, "command": command, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "machine": info, "results": [r.to_dict() for r in results], "targets": goals},
        indent=2,
    ) + "\n")
    log(f"wrote {args.output} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
