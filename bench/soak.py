"""`make soak` / `python -m bench.soak [--duration 600] [--model embedded] [--clients 8] ...`

A sustained mixed load against a real flow for a set time: the service's gateway (gRPC and HTTP, as flow.yml) and
one executor, on the embedded SmolLM2-135M-Instruct by default (the product; `--model` takes a local directory
too, e.g. a small random model for a quick run). `--clients` steady clients each loop over a mix of requests:

  normal     bench.load's prompts, a third of them behind a long context (up to ~1,500 prompt tokens),
             max_tokens 16 to 128, read to the end;
  cancelled  a long answer whose client task is cancelled after 0 to 32 documents (as a client that leaves);
  bad input  an empty prompt, max_tokens < 1 or past the context, a prompt past the context;

and every `--burst-every` seconds a burst of more short requests than the flow admits (max_running +
max_waiting + 8) overloads it; a steady client refused as overloaded waits a second before its next request.
Every request is bounded (`--request-timeout`): one that takes longer is a hang.

Figures (SOAK.md, bench/soak_results.json): requests by outcome, the unexpected ones (errors a request should
not get, hangs, streams without a last document), p50/p95 TTFT, inter-token latency and end-to-end time of the
completed streams (at the client, as bench.load times them), the resident memory of the executor and of the
gateway at the start (after a warm-up request) and at the end (once idle), sampled in between, the executor's own
counters, and whether a normal request still streams after it all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import psutil

from bench import flows, report
from bench.load import PROMPTS, OpenStream, StreamTiming, percentile, time_stream
from harness.processes import process_listening_on
from harness.service import Service, serve
from schemas import ErrorCode, ModelOutputDocument

ROOT = Path(__file__).resolve().parent.parent

NORMAL, CANCELLED, BAD_INPUT, BURST = "normal", "cancelled", "bad input", "burst"
MIX = {NORMAL: 0.6, CANCELLED: 0.25, BAD_INPUT: 0.15}  # what a steady client sends, by weight
NORMAL_MAX_TOKENS = (16, 32, 64, 128)
CANCELLED_MAX_TOKENS = 256  # far more than read before the cancellation, so that the cancellation ends it
CANCEL_AFTER_MAX = 32  # documents a cancelled client reads at most before it leaves
BURST_MAX_TOKENS = 8
# (prompt, max_tokens) pairs the service must refuse with an error document. The embedded model's context is
# 4096 tokens: 100,000 new tokens never fit, nor a 6,000-word prompt.
BAD_INPUTS = [("", 16), ("   \n\t ", 16), ("hello", 0), ("hello", -5), ("hello", 100_000), ("word " * 6_000, 16)]
OVERLOAD_BACKOFF_S = 1.0  # a steady client refused as overloaded waits this long, as told ("retry later")
CONTEXT_FILLER = "The following notes describe the setting in detail, and every detail matters to the answer. "

COMPLETED = "completed"
CANCELLED_BY_CLIENT = "cancelled by the client"
REFUSED_BAD_INPUT = "refused: bad input"
REFUSED_OVERLOADED = "refused: overloaded"
UNEXPECTED = "unexpected"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=600, help="seconds of load (default 600); the last requests then finish"
    )
    parser.add_argument(
        "--model", default="embedded", help="the executor's model: embedded (default, the product) or a local directory"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", type=int, default=8, help="steady clients, each one request at a time (default 8)")
    # Smaller than flow.yml's 32/256, so that a burst on a CPU machine reaches the limit without hundreds of streams.
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--max-waiting", type=int, default=16)
    parser.add_argument("--burst-every", type=float, default=60, help="seconds between overload bursts (default 60)")
    parser.add_argument(
        "--request-timeout", type=float, default=300, help="a request that takes longer is counted as a hang"
    )
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0, help="of the request mix")
    parser.add_argument("--output", type=Path, default=ROOT / "SOAK.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "soak_results.json")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Record:
    kind: str
    outcome: str  # one of the constants above; UNEXPECTED ones carry `detail`
    detail: str = ""
    prompt_chars: int = 0
    max_tokens: int = 0
    tokens: int = 0
    documents: int = 0  # received, the error document included
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    end_to_end_s: float | None = None


class RecordingStream:
    """An OpenStream (for bench.load.time_stream) that remembers the last document of the stream it opens and
    signals once `cancel_after` documents have arrived."""

    def __init__(self, open_stream: OpenStream, cancel_after: int | None = None) -> None:
        self.open_stream = open_stream
        self.cancel_after = cancel_after
        self.last: ModelOutputDocument | None = None
        self.documents = 0
        self.reached = asyncio.Event()

    async def __call__(self, prompt: str, max_tokens: int) -> AsyncIterator[ModelOutputDocument]:
        if self.cancel_after == 0:
            self.reached.set()
        async for doc in self.open_stream(prompt, max_tokens):
            self.last, self.documents = doc, self.documents + 1
            if self.documents == self.cancel_after:
                self.reached.set()
            yield doc


def classify(kind: str, last: ModelOutputDocument | None, timing: StreamTiming) -> tuple[str, str]:
    if last is not None and last.finish_reason == "error":
        if last.error_code == ErrorCode.OVERLOADED:
            return REFUSED_OVERLOADED, ""
        if kind == BAD_INPUT and last.error_code == ErrorCode.INVALID_REQUEST:
            return REFUSED_BAD_INPUT, ""
        return UNEXPECTED, f"error document ({last.error_code}): {last.error}"
    if timing.error:  # time_stream's record of an exception out of the stream
        return UNEXPECTED, f"client exception: {timing.error}"
    if last is None:
        return UNEXPECTED, "the stream ended without a document"
    if last.finish_reason is None:
        return UNEXPECTED, "the stream ended without a finish_reason"
    if kind == BAD_INPUT:
        return UNEXPECTED, f"bad input served (finish_reason {last.finish_reason})"
    return f"{COMPLETED}: {last.finish_reason}", ""


async def one_request(
    open_stream: OpenStream, kind: str, prompt: str, max_tokens: int, timeout: float, cancel_after: int | None = None
) -> Record:
    """One stream, timed by bench.load.time_stream; a cancelled one is cancelled (its task, as a client does)
    once it holds `cancel_after` documents."""
    stream = RecordingStream(open_stream, cancel_after)
    started = time.perf_counter()
    finished_at: list[float] = []

    async def timed() -> StreamTiming:
        timing = await time_stream(stream, prompt, max_tokens)
        finished_at.append(time.perf_counter())
        return timing

    task = asyncio.create_task(timed())
    if cancel_after is not None:
        reached = asyncio.create_task(stream.reached.wait())
        await asyncio.wait([reached, task], return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        task.cancel()  # a no-op for a stream that ended (eos) before its cancellation point
    done, _ = await asyncio.wait([task], timeout=timeout)
    record = Record(kind, UNEXPECTED, prompt_chars=len(prompt), max_tokens=max_tokens, documents=stream.documents)
    if not done:
        task.cancel()
        record.detail = f"hang: no end within {timeout:.0f} s"
    elif task.cancelled():
        record.outcome = CANCELLED_BY_CLIENT
    else:
        timing = task.result()
        record.outcome, record.detail = classify(kind, stream.last, timing)
        record.tokens, record.ttft_s, record.gaps_s = timing.tokens, timing.ttft_s, timing.gaps_s
        record.end_to_end_s = finished_at[0] - started
    return record


class Load:
    def __init__(self, args: argparse.Namespace, open_stream: OpenStream) -> None:
        self.args = args
        self.open_stream = open_stream
        self.rng = random.Random(args.seed)
        self.records: list[Record] = []

    def normal_prompt(self) -> str:
        prompt = self.rng.choice(PROMPTS)
        if self.rng.random() < 1 / 3:  # a long context first: up to ~1,500 prompt tokens, prefilled in chunks
            prompt = CONTEXT_FILLER * self.rng.randint(5, 80) + "\n\n" + prompt
        return prompt

    async def client(self, deadline: float) -> None:
        timeout = self.args.request_timeout
        while time.monotonic() < deadline:
            kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
            if kind == NORMAL:
                request = one_request(
                    self.open_stream, kind, self.normal_prompt(), self.rng.choice(NORMAL_MAX_TOKENS), timeout
                )
            elif kind == CANCELLED:
                cancel_after = self.rng.randint(0, CANCEL_AFTER_MAX)
                request = one_request(
                    self.open_stream, kind, self.normal_prompt(), CANCELLED_MAX_TOKENS, timeout, cancel_after
                )
            else:
                prompt, max_tokens = self.rng.choice(BAD_INPUTS)
                request = one_request(self.open_stream, kind, prompt, max_tokens, timeout)
            record = await request
            self.records.append(record)
            if record.outcome == REFUSED_OVERLOADED:
                await asyncio.sleep(OVERLOAD_BACKOFF_S)

    async def bursts(self, deadline: float) -> None:
        size = self.args.max_running + self.args.max_waiting + 8
        while time.monotonic() + self.args.burst_every / 2 < deadline:
            await asyncio.sleep(min(self.args.burst_every, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                return
            log(f"burst of {size} streams")
            self.records += await asyncio.gather(
                *(
                    one_request(
                        self.open_stream, BURST, self.rng.choice(PROMPTS), BURST_MAX_TOKENS, self.args.request_timeout
                    )
                    for _ in range(size)
                )
            )


async def sample_memory(
    processes: dict[str, psutil.Process], samples: list[dict], every: float, started: float
) -> None:
    while True:
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                **{f"{name}_rss_mib": round(p.memory_info().rss / 2**20, 1) for name, p in processes.items()},
            }
        )
        await asyncio.sleep(every)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize(records: list[Record]) -> dict:
    completed = [r for r in records if r.outcome.startswith(COMPLETED)]
    ttfts = [r.ttft_s for r in completed if r.ttft_s is not None]
    gaps = [g for r in completed for g in r.gaps_s]
    ends = [r.end_to_end_s for r in completed if r.end_to_end_s is not None]
    unexpected = [r for r in records if r.outcome == UNEXPECTED]
    return {
        "requests": len(records),
        "by_outcome": dict(Counter(r.outcome for r in records).most_common()),
        "by_kind_and_outcome": {
            kind: dict(Counter(r.outcome for r in records if r.kind == kind).most_common())
            for kind in (NORMAL, CANCELLED, BAD_INPUT, BURST)
        },
        "unexpected": len(unexpected),
        "unexpected_examples": sorted({r.detail[:300] for r in unexpected})[:10],
        "tokens_received": sum(r.tokens for r in records),
        "ttft_ms": {"p50": _ms(percentile(ttfts, 50)), "p95": _ms(percentile(ttfts, 95)), "n": len(ttfts)},
        "itl_ms": {"p50": _ms(percentile(gaps, 50)), "p95": _ms(percentile(gaps, 95)), "n": len(gaps)},
        "end_to_end_s": {"p50": percentile(ends, 50), "p95": percentile(ends, 95), "n": len(ends)},
    }


async def wait_idle(service: Service, timeout: float) -> float | None:
    """Seconds until the executor runs and queues nothing, or None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if service.running_streams() + service.waiting_streams() == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    return None


def executor_counts(service: Service) -> dict[str, float]:
    reasons = ("length", "eos", "stop", "context_length", "cancelled", "error", "shutdown")
    return {reason: service.metric("llm_requests_total", finish_reason=reason) for reason in reasons}


async def soak(args: argparse.Namespace, service: Service) -> dict:
    open_stream = flows.grpc_stream(service.grpc_port)
    processes = {
        "executor": process_listening_on(service.monitoring_port),
        "gateway": process_listening_on(service.grpc_port),
    }
    await one_request(open_stream, NORMAL, PROMPTS[0], 16, args.request_timeout)  # warm-up, not counted
    counts_before = executor_counts(service)
    rss_start = {name: p.memory_info().rss for name, p in processes.items()}
    samples: list[dict] = []
    started = time.monotonic()
    sampler = asyncio.create_task(sample_memory(processes, samples, args.sample_every, started))
    load = Load(args, open_stream)
    deadline = started + args.duration
    log(f"load for {args.duration:.0f} s: {args.clients} clients, a burst every {args.burst_every:.0f} s")
    await asyncio.gather(load.bursts(deadline), *(load.client(deadline) for _ in range(args.clients)))
    load_s = time.monotonic() - started
    log(f"load done after {load_s:.0f} s ({len(load.records)} requests); waiting for the executor to be idle")
    idle_after_s = await wait_idle(service, timeout=args.request_timeout)
    sampler.cancel()
    rss_end = {name: p.memory_info().rss for name, p in processes.items()}
    health = await one_request(open_stream, NORMAL, "what is the capital of France ?", 16, args.request_timeout)
    counts = {k: v - counts_before[k] for k, v in executor_counts(service).items()}
    cancelled_inside = sum(1 for r in load.records if r.outcome == CANCELLED_BY_CLIENT and r.documents > 0)
    summary = summarize(load.records)
    summary.update(
        load_s=round(load_s, 1),
        executor_idle_after_load_s=None if idle_after_s is None else round(idle_after_s, 1),
        healthy_after=health.outcome.startswith(COMPLETED),
        memory_mib={
            name: {
                "start": round(rss_start[name] / 2**20, 1),
                "end": round(rss_end[name] / 2**20, 1),
                "max_sampled": max(s[f"{name}_rss_mib"] for s in samples),
            }
            for name in processes
        },
        memory_samples=samples,
        executor_counts=counts,
        # A client cancelled after its first document was certainly inside the executor: each must be counted
        # there as cancelled (the engine counts it as it drops the request). One that is not ran on to max_tokens:
        # its cancellation was lost on the way (docs/architecture.md names the places that lost them).
        cancellations={
            "by_clients": summary["by_outcome"].get(CANCELLED_BY_CLIENT, 0),
            "after_the_first_document": cancelled_inside,
            "counted_by_the_executor": counts["cancelled"],
            "not_counted": max(0, cancelled_inside - int(counts["cancelled"])),
        },
    )
    return summary


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    s, settings = result["summary"], result["settings"]
    memory = s["memory_mib"]
    idle_after = s["executor_idle_after_load_s"]
    lines = [
        "# Soak",
        "",
        f"Run on {result['date']} with `{result['command']}` (`make soak` runs `.venv/bin/python -m bench.soak`, "
        "10 minutes by default). What it does: the docstring of `bench/soak.py`.",
        "",
        f"- flow: the service's gateway (gRPC + HTTP, as flow.yml) and one executor, model `{settings['model']}`, "
        f"device `{settings['device']}`, dtype `{settings['dtype']}`, max_running {settings['max_running']}, "
        f"max_waiting {settings['max_waiting']}",
        f"- load: {settings['clients']} steady clients for {s['load_s']:.0f} s (normal {MIX[NORMAL]:.0%}, cancelled "
        f"{MIX[CANCELLED]:.0%}, bad input {MIX[BAD_INPUT]:.0%}), a burst of "
        f"{settings['max_running'] + settings['max_waiting'] + 8} streams every {settings['burst_every']:.0f} s",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load average at start / end: "
        f"{result['machine']['load_average_at_start'][0]:.2f} / {result['machine']['load_average_at_end'][0]:.2f}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests | {s['requests']} |",
        *[f"| {outcome} | {n} |" for outcome, n in s["by_outcome"].items()],
        f"| unexpected (errors, hangs, streams without an end) | {s['unexpected']} |",
        f"| TTFT p50 / p95 | {_fmt(s['ttft_ms']['p50'])} / {_fmt(s['ttft_ms']['p95'])} ms |",
        f"| inter-token latency p50 / p95 | {_fmt(s['itl_ms']['p50'], 1)} / {_fmt(s['itl_ms']['p95'], 1)} ms |",
        f"| end-to-end p50 / p95 (completed streams) | {_fmt(s['end_to_end_s']['p50'], 2)} / "
        f"{_fmt(s['end_to_end_s']['p95'], 2)} s |",
        f"| executor RSS start / end (max sampled) | {memory['executor']['start']:.0f} / "
        f"{memory['executor']['end']:.0f} ({memory['executor']['max_sampled']:.0f}) MiB |",
        f"| gateway RSS start / end (max sampled) | {memory['gateway']['start']:.0f} / {memory['gateway']['end']:.0f} "
        f"({memory['gateway']['max_sampled']:.0f}) MiB |",
        f"| executor idle after the load | {'never' if idle_after is None else f'{idle_after} s'} |",
        f"| client cancellations after the first document / counted by the executor | "
        f"{s['cancellations']['after_the_first_document']} / {s['cancellations']['counted_by_the_executor']:.0f} |",
        f"| a normal request afterwards | {'streams' if s['healthy_after'] else 'FAILED'} |",
        "",
    ]
    if s["unexpected_examples"]:
        lines += ["Unexpected outcomes (distinct, first 10):", "", *[f"- `{e}`" for e in s["unexpected_examples"]], ""]
    lines += [
        "Latencies are measured at the client over the completed streams (cancelled and refused ones are left out), "
        "as `bench/load.py` times them: TTFT from opening the stream to the first token, inter-token latency between "
        "consecutive tokens, end-to-end from opening the stream to its last document. Overload refusals are expected "
        "outcomes of the bursts (and of steady requests that arrive during one). Every client cancellation after the "
        "first document should be counted by the executor: a shortfall is a cancellation lost on its way, a stream "
        "that ran on to max_tokens. The executor's RSS "
        "follows its working set (the embedded model's KV cache is 23-46 KiB per token in bfloat16/float32, and up "
        "to max_running long prompts are in flight) and the allocator keeps some of it after a peak: a leak shows "
        "as an end figure that grows with --duration, not as end > start in one run. All figures, with the "
        "memory samples: "
        f"`{result['json']}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    command = "python -m bench.soak" + ("" if len(sys.argv) <= 1 else " " + " ".join(sys.argv[1:]))
    machine = {
        "cpu": report.cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "jina": version("jina"),
        "load_average_at_start": os.getloadavg(),
    }
    uses_with = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "max_running": args.max_running,
        "max_waiting": args.max_waiting,
    }
    log(f"starting the flow ({args.model})")
    with serve(flows.LogDirs(), "soak", uses_with, model_name=args.model) as service:
        summary = asyncio.run(soak(args, service))
    machine["load_average_at_end"] = os.getloadavg()
    result = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "summary": summary,
        "json": os.path.relpath(args.json, ROOT),
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.output.write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {args.output} and {args.json}")
    return 0 if summary["unexpected"] == 0 and summary["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
