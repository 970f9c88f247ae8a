"""The machine description, the issue's targets computed from the numbers, and the markdown of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version

import torch

from bench.load import RoundResult

CEILING = "in-process KV-cache loop"
ENGINE = "LLMEngine in-process"
SERVICE = "service (Jina flow, gRPC)"
SEED = "seed design (Jina flow, gRPC)"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
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


def _find(results: list[RoundResult], system: str, streams: int | None = None) -> RoundResult | None:
    rows = [r for r in results if r.system == system and (streams is None or r.streams == streams)]
    return max(rows, key=lambda r: r.streams) if rows else None


def targets(results: list[RoundResult]) -> list[dict]:
    """The issue's targets: [{target, measured, passed (True/False/None when not measured)}]."""
    out = []
    ceiling, single = _find(results, CEILING, 1), _find(results, SERVICE, 1)
    if ceiling and single:
        ratio = single.tokens_per_s / ceiling.tokens_per_s
        out.append(dict(target="single stream within 10% of the in-process loop's tokens/s",
                        measured=f"{single.tokens_per_s:.1f} vs {ceiling.tokens_per_s:.1f} tok/s ({ratio:.0%})", passed=ratio >= 0.9))
    sixteen = _find(results, SERVICE, 16)
    seed = _find(results, SEED, 16) or _find(results, SEED)
    if sixteen is None:
        for name in ("16 streams: >= 20x the seed design's aggregate tokens/s", "16 streams: p50 TTFT < 500 ms", "16 streams: p50 ITL < 100 ms"):
            out.append(dict(target=name, measured="not measured (no 16-stream round in this run)", passed=None))
        return out
    if seed is not None:
        ratio = sixteen.tokens_per_s / seed.tokens_per_s
        out.append(dict(target="16 streams: >= 20x the seed design's aggregate tokens/s",
                        measured=f"{sixteen.tokens_per_s:.1f} vs {seed.tokens_per_s:.2f} tok/s (seed at N={seed.streams}): {ratio:.1f}x",
                        passed=ratio >= 20))
    out.append(dict(target="16 streams: p50 TTFT < 500 ms", measured=f"{sixteen.ttft_p50_ms:.0f} ms", passed=sixteen.ttft_p50_ms < 500))
    out.append(dict(target="16 streams: p50 ITL < 100 ms", measured=f"{sixteen.itl_p50_ms:.1f} ms", passed=sixteen.itl_p50_ms < 100))
    return out


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: list[RoundResult]) -> str:
    lines = [
        "| system | streams | tokens/stream (mean / max) | rounds | agg tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | errors | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        per_stream = r.tokens / (r.streams * r.rounds)
        lines.append(
            f"| {r.system} | {r.streams} | {per_stream:.1f} / {r.max_tokens} | {r.rounds} | {r.tokens_per_s:.1f} | "
            f"{_num(r.ttft_p50_ms)} | {_num(r.ttft_p95_ms)} | {_num(r.itl_p50_ms, 1)} | {_num(r.itl_p95_ms, 1)} | {r.errors} | {r.note} |"
        )
    return "\n".join(lines)


def markdown(date: str, command: str, info: dict, results: list[RoundResult], goals: list[dict], notes: list[str], quick: bool) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    machine_lines = [
        f"- CPU: {info['cpu']}, {info['cores']} cores available to the benchmark",
        f"- device: {info['device']}" + (f" ({info['cuda_device']})" if info["cuda_device"] else "") + f", dtype: {info['dtype']}",
        f"- torch {info['torch']} ({info['torch_threads']} intra-op threads), transformers {info['transformers']}, jina {info['jina']}, docarray {info['docarray']}",
        "- load average (1/5/15 min) at start: " + " / ".join(f"{x:.2f}" for x in info["load_average_at_start"])
        + ", at end: " + " / ".join(f"{x:.2f}" for x in info["load_average_at_end"]),
    ]
    warnings = []
    if quick:
        warnings.append("> **Smoke run (`--quick`)**: few streams and tokens, one round; these are not the benchmark's numbers.")
    # At the start only: by the end, the load average counts the benchmark's own processes (about 2 on 2 cores).
    if info["device"] == "cpu" and info["load_average_at_start"][0] > info["cores"]:
        warnings.append("> **Busy machine**: the load average exceeded the core count when the run started, so other "
                        "processes competed for the CPU and the numbers are noisy (latencies inflated, rates deflated).")
    goal_lines = ["| target | measured | result |", "|---|---|---|"] + [
        f"| {g['target']} | {g['measured']} | {mark[g['passed']]} |" for g in goals
    ]
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
            "## Targets (issue 3)",
            "",
            *goal_lines,
            "",
            "## How it is measured",
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
