"""The machine description, the issues' targets computed from the numbers, and the markdown of BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import psutil
import torch

from bench.load import RoundResult

CEILING = "in-process KV-cache loop"
ENGINE = "LLMEngine in-process"
SERVICE = "service (Jina flow, gRPC)"
SEED = "seed design (Jina flow, gRPC)"
SERVICE_HTTP = "service (Jina flow, OpenAI API)"
LLAMA_F32 = "llama.cpp server F32 (OpenAI API)"
LLAMA_Q4 = "llama.cpp server Q4_1 (OpenAI API)"
PEER_PARALLEL = 16  # llama.cpp's slots: as many as the most streams it is compared at

MARK = {True: "PASS", False: "FAIL", None: "n/a"}
BUSY_CORES = 0.25  # other processes' average CPU use above which a run is flagged as disturbed
LEVERS = Path(__file__).resolve().parent / "levers.md"
REPLICAS = Path(__file__).resolve().parent / "replicas.md"  # python -m bench.chat --replicas 2 writes it


def quantized_service(quantization: str) -> str:
    return f"service, quantization {quantization} (Jina flow, OpenAI API)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device, dtype: torch.dtype) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": version("transformers"),
        "jina": version("jina"),
        "docarray": version("docarray"),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": os.getloadavg(),
    }
    return info


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine, and by this process with all its descendants (the flows,
    llama.cpp's servers, the ceiling's process). Between two readings, the difference of the differences is what
    other processes took from the benchmark."""
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
    me = psutil.Process()
    own = sum(me.cpu_times()[:4])  # user, system, and those of its waited-for children
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # ended while we looked
            own += sum(child.cpu_times()[:2])
    return busy, own


def other_cores(before: tuple[float, float], after: tuple[float, float], elapsed_s: float) -> float:
    """Cores' worth of CPU that processes outside the benchmark used on average between two cpu_seconds()."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / elapsed_s


def _find(results: list[RoundResult], system: str, streams: int | None = None) -> RoundResult | None:
    rows = [r for r in results if r.system == system and (streams is None or r.streams == streams)]
    return max(rows, key=lambda r: r.streams) if rows else None


def _ratio_goal(issues: str, target: str, ours: RoundResult | None, peer: RoundResult | None, goal: float) -> dict:
    if ours is None or peer is None:
        return dict(issues=issues, target=target, measured="not measured in this run", passed=None)
    ratio = ours.tokens_per_s / peer.tokens_per_s
    return dict(
        issues=issues,
        target=target,
        passed=ratio >= goal,
        measured=f"{ours.tokens_per_s:.1f} vs {peer.tokens_per_s:.1f} tok/s: {ratio:.2f}x",
    )


def targets(results: list[RoundResult], quantizations: list[str]) -> list[dict]:
    """The issues' targets: [{issues, target, measured, passed (True/False/None when not measured)}]."""
    out = []
    ceiling, single = _find(results, CEILING, 1), _find(results, SERVICE, 1)
    if ceiling and single:
        ratio = single.tokens_per_s / ceiling.tokens_per_s
        out.append(
            dict(
                issues="3",
                target="single stream (gRPC) within 10% of the in-process loop's tokens/s",
                measured=f"{single.tokens_per_s:.1f} vs {ceiling.tokens_per_s:.1f} tok/s ({ratio:.0%})",
                passed=ratio >= 0.9,
            )
        )
    sixteen = _find(results, SERVICE, 16)
    seed = _find(results, SEED, 16) or _find(results, SEED)
    grpc_goals = [
        ("3, 10", "gRPC, 16 streams: >= 20x the seed design's aggregate tokens/s"),
        ("3, 10", "gRPC, 16 streams: p50 TTFT < 500 ms"),
        ("3", "gRPC, 16 streams: p50 ITL < 100 ms"),
    ]
    if sixteen is None:
        out += [
            dict(issues=i, target=t, measured="not measured (no 16-stream round in this run)", passed=None)
            for i, t in grpc_goals
        ]
    else:
        if seed is not None:
            ratio = sixteen.tokens_per_s / seed.tokens_per_s
            out.append(
                dict(
                    issues=grpc_goals[0][0],
                    target=grpc_goals[0][1],
                    passed=ratio >= 20,
                    measured=f"{sixteen.tokens_per_s:.1f} vs {seed.tokens_per_s:.2f} tok/s "
                    f"(seed at N={seed.streams}): {ratio:.1f}x",
                )
            )
        out.append(
            dict(
                issues=grpc_goals[1][0],
                target=grpc_goals[1][1],
                measured=f"{sixteen.ttft_p50_ms:.0f} ms",
                passed=sixteen.ttft_p50_ms < 500,
            )
        )
        out.append(
            dict(
                issues=grpc_goals[2][0],
                target=grpc_goals[2][1],
                measured=f"{sixteen.itl_p50_ms:.1f} ms",
                passed=sixteen.itl_p50_ms < 100,
            )
        )
    for n in (1, 16):
        out.append(
            _ratio_goal(
                "10",
                f"OpenAI API, {n} stream{'s' * (n > 1)}: >= 1.0x llama.cpp F32",
                _find(results, SERVICE_HTTP, n),
                _find(results, LLAMA_F32, n),
                1.0,
            )
        )
    for quantization in quantizations or ["none given"]:
        for n, goal in ((1, 0.8), (16, 1.0)):
            out.append(
                _ratio_goal(
                    "10",
                    f"quantized mode ({quantization}), OpenAI API, {n} stream{'s' * (n > 1)}: "
                    f">= {goal:.1f}x llama.cpp Q4_1",
                    _find(results, quantized_service(quantization), n),
                    _find(results, LLAMA_Q4, n),
                    goal,
                )
            )
    return out


def ratios(results: list[RoundResult]) -> list[str]:
    """Each service row over the OpenAI API against llama.cpp at the same stream count: aggregate tokens/s
    (no lines when llama.cpp was left out)."""
    if not any(r.system in (LLAMA_F32, LLAMA_Q4) for r in results):
        return []
    lines = ["| system | streams | tok/s | / llama.cpp F32 | / llama.cpp Q4_1 |", "|---|---:|---:|---:|---:|"]
    for r in results:
        if not r.system.startswith("service") or "OpenAI" not in r.system:
            continue
        cells = []
        for peer in (LLAMA_F32, LLAMA_Q4):
            other = _find(results, peer, r.streams)
            cells.append(f"{r.tokens_per_s / other.tokens_per_s:.2f}x" if other else "–")
        lines.append(f"| {r.system} | {r.streams} | {r.tokens_per_s:.1f} | {' | '.join(cells)} |")
    return lines


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: list[RoundResult]) -> str:
    lines = [
        "| system | streams | prompt tokens (mean) | tokens/stream (mean / max) | rounds | agg tok/s "
        "| TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | errors | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        per_stream = r.tokens / (r.streams * r.rounds)
        lines.append(
            f"| {r.system} | {r.streams} | {_num(r.prompt_tokens, 1)} | {per_stream:.1f} / {r.max_tokens} | "
            f"{r.rounds} | {r.tokens_per_s:.1f} | {_num(r.ttft_p50_ms)} | {_num(r.ttft_p95_ms)} | "
            f"{_num(r.itl_p50_ms, 1)} | {_num(r.itl_p95_ms, 1)} | {r.errors} | {r.note} |"
        )
    return "\n".join(lines)


def markdown(
    date: str,
    command: str,
    info: dict,
    results: list[RoundResult],
    goals: list[dict],
    notes: list[str],
    quick: bool,
    sections: Sequence[str] = (),
) -> str:
    """`sections`: the lines of bench/chat.py's and bench/structured.py's sections, where they ran."""
    machine_lines = [
        f"- CPU: {info['cpu']}, {info['cores']} cores available to the benchmark",
        f"- device: {info['device']}"
        + (f" ({info['cuda_device']})" if info["cuda_device"] else "")
        + f", dtype: {info['dtype']}"
        + (f"; the engine in process ran: {info['runner']}" if "runner" in info else ""),
        f"- torch {info['torch']} ({info['torch_threads']} intra-op threads), transformers {info['transformers']}, "
        f"jina {info['jina']}, docarray {info['docarray']}",
        "- load average (1/5/15 min) at start: "
        + " / ".join(f"{x:.2f}" for x in info["load_average_at_start"])
        + ", at end: "
        + " / ".join(f"{x:.2f}" for x in info["load_average_at_end"]),
        f"- CPU used by other processes while the systems ran side by side: {info['other_cores']:.2f} cores on average",
    ]
    if peer := info.get("peer"):
        machine_lines.append(
            f"- llama.cpp: `llama-server` of {peer['llama.cpp']}, built here from source, on "
            + "; on ".join(f"{model}: `{flags}`" for model, flags in peer["servers"].items())
        )
    if "quantization" in info:
        machine_lines.append(f"- quantized service: {info['quantization']}")
    warnings = []
    if info.get("interrupted"):
        warnings.append(
            "> **Interrupted**: the run was stopped before it finished; only the settings below were measured."
        )
    if quick:
        warnings.append(
            "> **Smoke run (`--quick`)**: few streams and tokens, one round; these are not the benchmark's numbers."
        )
    # At the start only: by the end, the load average counts the benchmark's own processes (about 2 on 2 cores).
    busy_at_start = info["load_average_at_start"][0] > info["cores"]
    if info["device"] == "cpu" and (busy_at_start or info["other_cores"] > BUSY_CORES):
        warnings.append(
            "> **Busy machine**: "
            + ("the load average exceeded the core count when the run started and " if busy_at_start else "")
            + f"other processes used {info['other_cores']:.2f} cores on average while the systems ran, so they "
            "competed for the CPU and the numbers are noisy (latencies inflated, rates deflated), and the systems "
            "do not slow down alike, so the ratios between them are unreliable too."
        )
    goal_lines = ["| issue | target | measured | result |", "|---|---|---|---|"] + [
        f"| {g['issues']} | {g['target']} | {g['measured']} | {MARK[g['passed']]} |" for g in goals
    ]
    against = ratios(results)
    levers = (
        ["## Levers of the fast decode path", "", "Measured one by one: [bench/levers.md](bench/levers.md).", ""]
        if LEVERS.is_file()
        else []
    )
    # Its own run's (make bench runs one replica), kept as it is: the title becomes the section's.
    replicas = ["## Several replicas", "", *REPLICAS.read_text().splitlines()[2:], ""] if REPLICAS.is_file() else []
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Run on {date} with `{command}` (`make bench` runs `.venv/bin/python -m bench`).",
            "",
            *[line for w in warnings for line in (w, "")],
            "## Machine",
            "",
            *machine_lines,
            "",
            "## Results",
            "",
            table(results),
            "",
            *[
                line
                for line in ("## Against llama.cpp (aggregate tokens/s, same run, same API)", "", *against, "")
                if against
            ],
            "## Targets (issues 3 and 10)",
            "",
            *goal_lines,
            "",
            *sections,
            *replicas,
            "## How it is measured",
            "",
            *[f"- {n}" for n in notes],
            "",
            *levers,
            *OTHER_MEASUREMENTS,
            *EARLIER_EVALUATIONS,
        ]
    )


# Not rerun by `make bench`: figures measured by other tools or by hand, which the docs (docs/) point to.
OTHER_MEASUREMENTS = [
    "## Other measurements",
    "",
    "Not rerun by `make bench`. The burst trace, the prefill roofline and the levers have reports of their own: "
    "[bench/trace.md](bench/trace.md) (`python -m bench.trace`), [bench/roofline.md](bench/roofline.md) "
    "(`python -m bench.roofline`), [bench/levers.md](bench/levers.md) (`python -m bench.levers`); the soak's last "
    "run is [SOAK.md](SOAK.md) (`make soak`).",
    "",
    "- Start-up, on a busy 2-core host: converting the embedded GGUF into the safetensors cache (once) took about "
    "20 s; a flow whose model is a hub id missing from the local cache exited with status 1 about 20 s after its "
    "start, mostly the processes' imports.",
    "- Metrics binds, on a busy 2-core host: Jina's Prometheus endpoints listen on every address until "
    "`workarounds/jina_monitoring.py` moves them, the gateway's for 1.4 s, the executor's for 11 s (while torch "
    "imports).",
    "- Building llama.cpp's server for the comparison (`bench/peer.py`, once, then cached): about 25 minutes on 2 "
    "cores.",
    "- Predictions (`python -m bench.predictions_soak`, embedded model, in memory): the gateway at 215 MiB before "
    "and 220 MiB at most over 223 predictions in 90 s, 0 unexpected; with `--ttl 20 --max-kept 200` the last 50 "
    "created all answered 404 after the TTL. `--in-process`: 3.7 KiB per kept prediction of 256 tokens, so the "
    "default 10000 predictions of 256 tokens take about 37 MiB.",
    "- Time to first token of a burst on 2 AVX2 cores: on the AMX Xeon capped at AVX2 (torch, oneDNN, MKL and the "
    "AVX2 kernels' build), a prefill group's matmuls ran at 70-77% of the float32 FMA roof, 1.7-2.3 ms a token "
    "(bench/roofline.md, two runs). The median of 16 simultaneous streams gets its first token once about 9 "
    "prompts of 26 tokens are prefilled, 49.6 GFLOP of matmuls: 300-380 ms even at the roof, about 390-520 ms at "
    "the rates measured, before attention, the rest of each layer, the decode steps due in between and gRPC, so "
    "at full precision on 2 AVX2 cores the 500 ms p50 goal is out of reach. `make bench` under that cap "
    "(`--skip-peer --skip-seed`): gRPC at 16 streams p50 TTFT 831 ms, in process 886 ms, 177.6 tok/s.",
    "",
]

# Not rerun by the benchmark: the conclusions of an evaluation whose script was removed from the tree.
EARLIER_EVALUATIONS = [
    "## Earlier evaluations",
    "",
    "**transformers' continuous batching manager** (2026-11-24; transformers 5.23.0, torch 2.13.0+cpu, 2 cores; the "
    "script `bench/transformers_cb_eval.py` and its report `bench/transformers_cb_eval.md` are in git history, "
    "`git show 717ebc2:bench/transformers_cb_eval.md`). Same model and chat template, varied prompts of 34-44 "
    "tokens, 64 new tokens, greedy, EOS ignored, bfloat16, on an idle host with 2 torch threads:",
    "",
    "| system | streams | agg tok/s | TTFT p50 ms | ITL p50 ms |",
    "|---|---:|---:|---:|---:|",
    "| hand-written DynamicCache loop | 1 | 16.1 | 105 | 61 |",
    "| transformers CB manager | 1 | 11.4 | 107 | 86 |",
    "| transformers CB manager | 16 | 97.9 | 946 | 149 |",
    "| LLMEngine (`make bench`, same host within the hour, four runs) | 16 | 202-231 | 229-420 | 61-75 |",
    "",
    "At 16 streams the manager gave half the engine's throughput and two to four times its time to first token, "
    "so the engine keeps its own scheduler. Also found: with `ContinuousBatchingConfig()` defaults on CPU the paged "
    "cache is sized from host RAM (5.1 GB of KV cache plus a 3.9 GB dense attention mask, peak RSS 9.8 GB) and the "
    "first token came after 37.9 s (`page_size=64, num_blocks=256, max_batch_tokens=2048` works); on CPU every "
    "request attends over the concatenated KV of all requests through a dense block-diagonal mask, so attention "
    "grows with streams x total context; `cancel_request` frees the request's blocks by the next step but never "
    "delivers a final output, so a consumer waiting for it waits forever; greedy outputs alone and in a batch of 16 "
    "were identical (4 of 4 prompts, float32).",
    "",
]
