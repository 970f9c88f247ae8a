"""`make soak` / `python -m bench.soak [--duration 600] [--model embedded] [--clients 8] ...`

A sustained mixed load against a real flow for a set time, then two attacks on it: the service's gateway (gRPC and
HTTP, as flow.yml) and one executor under `make serve`'s supervisor, on the embedded SmolLM2-135M-Instruct by
default (the product; `--model` takes a local directory too, e.g. a small random model for a quick run).
`--clients` steady clients each loop over a mix of requests:

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

Then, on the same flow (issue 25's cases):

  slow bodies  `--slow-connections` connections send a body at a byte a second (a new one whenever the server ends
               one) while a normal client's short completions (and `GET /ready`, the gateway's alone) are timed, in
               `--slow-body-rounds` attacked phases of `--slow-body-s` each between quiet ones: the attacked median
               over the quiet one (target 2x), with the CPU that other processes took in each phase, how the server
               ended the attack's connections, the RSS before and after;
  kill -9      the executor's process is killed under `--kill-streams` streams, with a finished prediction stored
               and another running; `/ready`, polled every `--ready-poll-ms` from a thread, must turn red within
               100 ms; then until the supervisor's new flow answers: how the streams ended, how long until it
               serves again, the restart counter, the stored prediction read back whole and the running one
               `failed` (0 lost), a normal request, the RSS of the processes before and of the new ones after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx
import psutil

from bench import flows, report
from bench.load import PROMPTS, OpenStream, StreamTiming, percentile, time_stream
from bench.slow_body import SLOW_BODY_LENGTH
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
SLOW_BODY_TARGET_RATIO = 2.0  # issue 25: a normal request under slow bodies within 2x its quiet latency
READY_TARGET_MS = 100.0  # issue 25: /ready red within 100 ms of the executor's death
KILL_MAX_TOKENS = 1024  # the streams and the prediction the kill interrupts: far from their end at the kill
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
    parser.add_argument("--slow-connections", type=int, default=100,
                        help="slow-body case: connections sending a body at a byte a second (default 100)")
    parser.add_argument("--slow-body-s", type=float, default=10,
                        help="slow-body case: seconds of each phase, quiet or attacked (default 10)")
    parser.add_argument("--slow-body-rounds", type=int, default=3,
                        help="slow-body case: attacked phases, each between two quiet ones (default 3)")
    parser.add_argument("--kill-streams", type=int, default=10,
                        help="kill -9 case: streams under way when the executor is killed (default 10)")
    parser.add_argument("--ready-poll-ms", type=float, default=5, help="kill -9 case: /ready polled this often")
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


def flow_processes(service: Service) -> dict[str, psutil.Process]:
    """The executor's process and the gateway's, found by the ports they listen on."""
    return {
        "executor": process_listening_on(service.monitoring_port),
        "gateway": process_listening_on(service.grpc_port),
    }


async def soak(args: argparse.Namespace, service: Service) -> dict:
    open_stream = flows.grpc_stream(service.grpc_port)
    processes = flow_processes(service)
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


# The slow-body case --------------------------------------------------------------------------------------------

PROBE_BODY = {"prompt": "what is the capital of France ?", "max_tokens": 4}
PROBE, READY_PROBE = "completion", "ready"  # a normal request through the engine; one the gateway answers alone
PROBE_PAUSE_S = 0.25  # between two probes: the probes measure the service, they are not a load of their own


def memory_mib(service: Service) -> dict[str, float]:
    """The RSS of the executor and of the gateway, whichever processes serve now (a restart replaces both)."""
    return {name: round(p.memory_info().rss / 2**20, 1) for name, p in flow_processes(service).items()}


async def timed(url: str, method: str, path: str, body: dict | None = None) -> float:
    """Seconds one request took, on a new connection as a new client's."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        response = await client.request(method, path, json=body)
        elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


async def probe_latencies(url: str, seconds: float) -> dict[str, list[float]]:
    """Seconds each of a normal client's requests took, one after another for `seconds`: a short completion (what
    the target is about), and `GET /ready`, which the gateway answers alone (its HTTP server's own share)."""
    latencies: dict[str, list[float]] = {PROBE: [], READY_PROBE: []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        latencies[PROBE].append(await timed(url, "POST", "/v1/completions", PROBE_BODY))
        latencies[READY_PROBE].append(await timed(url, "GET", "/ready"))
        await asyncio.sleep(PROBE_PAUSE_S)
    return latencies


def latency_figures(latencies: list[float]) -> dict:
    return {"p50_ms": _ms(percentile(latencies, 50)), "p95_ms": _ms(percentile(latencies, 95)),
            "max_ms": _ms(max(latencies)), "n": len(latencies)}


async def probe_phase(url: str, seconds: float, attacked: bool) -> dict:
    """One phase of probes (probe_latencies), with the cores' worth of CPU that processes outside the soak used
    meanwhile: on a shared machine, what else slowed the probes."""
    before, started = report.cpu_seconds(), time.monotonic()
    latencies = await probe_latencies(url, seconds)
    other = report.other_cores(before, report.cpu_seconds(), time.monotonic() - started)
    return {"attacked": attacked, "latencies": latencies, "other_cores": round(other, 2)}


async def slow_body_case(args: argparse.Namespace, service: Service) -> dict:
    """Normal requests quiet, then under `--slow-connections` slow bodies, `--slow-body-rounds` times, and quiet
    once more, each phase `--slow-body-s` long: alternated, so that the ratio of the attacked median to the quiet
    one is measured side by side, and what others run on the machine meanwhile weighs on both alike."""
    memory_before = memory_mib(service)
    phases, ends, lifetimes = [], Counter[str](), []
    log(f"slow bodies: {args.slow_body_rounds} rounds of {args.slow_connections} connections for "
        f"{args.slow_body_s:.0f} s, between quiet phases")
    for _ in range(args.slow_body_rounds):
        phases.append(await probe_phase(service.url, args.slow_body_s, attacked=False))
        attack = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.slow_body", str(service.http_port), "--connections",
            str(args.slow_connections), cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert attack.stdin is not None and attack.stdout is not None
        await attack.stdout.readline()  # "attacking"
        phases.append(await probe_phase(service.url, args.slow_body_s, attacked=True))
        attack.stdin.close()
        outcome = json.loads(await attack.stdout.readline())
        await attack.wait()
        ends.update(outcome["ended_by"])
        lifetimes += outcome["lifetimes_s"]
    phases.append(await probe_phase(service.url, args.slow_body_s, attacked=False))

    def pooled(probe: str, attacked: bool) -> list[float]:
        return [latency for phase in phases if phase["attacked"] is attacked for latency in phase["latencies"][probe]]

    probes = {}
    for probe in (PROBE, READY_PROBE):
        quiet, attacked = pooled(probe, False), pooled(probe, True)
        probes[probe] = {"quiet": latency_figures(quiet), "attacked": latency_figures(attacked),
                         "p50_ratio": round(statistics.median(attacked) / statistics.median(quiet), 2)}
    return {
        "connections": args.slow_connections,
        "rounds": args.slow_body_rounds,
        "phase_s": args.slow_body_s,
        "probe": PROBE_BODY,
        "probes": probes,
        "within_target": probes[PROBE]["p50_ratio"] <= SLOW_BODY_TARGET_RATIO,
        "phases": [
            {"attacked": phase["attacked"], "other_cores": phase["other_cores"],
             **{f"{probe}_p50_ms": _ms(statistics.median(phase["latencies"][probe])) for probe in (PROBE, READY_PROBE)},
             "n": len(phase["latencies"][PROBE])}
            for phase in phases
        ],
        "attack_connections_ended_by": dict(ends.most_common()),
        "attack_connection_lifetime_s": {"p50": percentile(lifetimes, 50), "max": max(lifetimes, default=None)},
        "memory_mib": {"before": memory_before, "after": memory_mib(service)},
    }


# The kill -9 case ----------------------------------------------------------------------------------------------


class ReadyWatch:
    """`GET /ready` asked from a thread of its own, one request every `every_s` on a kept-alive connection (the
    event loop is busy with the streams): when each answer began, and how many polls there were."""

    def __init__(self, port: int, every_s: float) -> None:
        self.port = port
        self.every_s = every_s
        self.changes: list[tuple[float, str]] = []  # (time.monotonic() the answer came, the answer): each a change
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-watch", daemon=True)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            try:
                connection.request("GET", "/ready")
                response = connection.getresponse()
                response.read()
                answer = str(response.status)
            except (OSError, http.client.HTTPException) as error:  # refused while the flow restarts
                answer = type(error).__name__
                connection.close()  # the next request connects again
            self.polls += 1
            if not self.changes or self.changes[-1][1] != answer:
                self.changes.append((time.monotonic(), answer))
            time.sleep(self.every_s)

    def first(self, after: float, answer: str | None = None, other_than: str | None = None) -> float | None:
        """Seconds from `after` to the first answer that is `answer` (or is not `other_than`)."""
        for at, seen in self.changes:
            if at >= after and (seen == answer if other_than is None else seen != other_than):
                return at - after
        return None


def exited(process: psutil.Process, every_s: float) -> float:
    """time.monotonic() once `process`'s main thread has exited: a zombie or gone. Its memory and sockets may
    outlive that: the last of its threads to exit frees the memory, and only then closes the files, which is when
    the gateway can see the death."""
    with contextlib.suppress(psutil.NoSuchProcess):
        while process.status() != psutil.STATUS_ZOMBIE:
            time.sleep(every_s)
    return time.monotonic()


async def interrupted_stream(stream: RecordingStream, prompt: str) -> str:
    """How a stream the kill interrupts ends: its last document's error code, its finish_reason, or the client's
    exception."""
    try:
        async for _ in stream(prompt, KILL_MAX_TOKENS):
            pass
    except Exception as error:  # noqa: BLE001 (recorded: what a client of the killed service gets)
        return " ".join(f"client exception: {type(error).__name__}: {error}".split())[:300]
    if stream.last is None:
        return "no document"
    if stream.last.finish_reason == "error":
        return f"error document: {stream.last.error_code}"
    return f"finished: {stream.last.finish_reason}"


async def prediction_when(client: httpx.AsyncClient, id: str, until: Callable[[dict], bool]) -> dict:
    """The prediction, long-polled until `until` holds for it."""
    while not until(prediction := (await client.get(f"/v1/predictions/{id}", params={"wait": 30})).json()):
        await asyncio.sleep(0.1)
    return prediction


def ended(prediction: dict) -> bool:
    return prediction["status"] not in ("starting", "processing")


async def kill_case(args: argparse.Namespace, service: Service) -> dict:
    """kill -9 of the executor under `--kill-streams` streams and two predictions (one finished, one running),
    `/ready` polled every `--ready-poll-ms`; then until the supervisor's new flow is ready, and what it serves."""
    memory_before = memory_mib(service)
    restarts_before = service.gateway_metric("llm_flow_restarts")
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
        created = await client.post("/v1/predictions", json={"input": {"prompt": PROMPTS[0], "max_tokens": 16}})
        stored = await prediction_when(client, created.json()["id"], ended)
        created = await client.post("/v1/predictions",
                                    json={"input": {"prompt": PROMPTS[1], "max_tokens": KILL_MAX_TOKENS}})
        await prediction_when(client, created.json()["id"], lambda p: bool(p["output"]) or ended(p))
        open_stream = flows.grpc_stream(service.grpc_port)
        streams = [RecordingStream(open_stream, cancel_after=1) for _ in range(args.kill_streams)]
        ends = [asyncio.create_task(interrupted_stream(stream, PROMPTS[i % len(PROMPTS)]))
                for i, stream in enumerate(streams)]
        await asyncio.wait_for(asyncio.gather(*(stream.reached.wait() for stream in streams)), args.request_timeout)
        running = (await client.get(f"/v1/predictions/{created.json()['id']}")).json()
    executor = process_listening_on(service.monitoring_port)
    with ReadyWatch(service.http_port, args.ready_poll_ms / 1000) as watch:
        await asyncio.sleep(0.5)  # a run of 200s before the kill: the watch works
        log(f"kill -9 of the executor (pid {executor.pid}) under {len(streams)} streams")
        exit_watch = asyncio.create_task(asyncio.to_thread(exited, executor, 0.001))
        killed_at = time.monotonic()
        executor.kill()
        exited_s = await exit_watch - killed_at
        stream_ends = await asyncio.wait_for(asyncio.gather(*ends), args.request_timeout)
        deadline = time.monotonic() + args.request_timeout
        while watch.first(killed_at, "200") is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    red_s, back_s = watch.first(killed_at, other_than="200"), watch.first(killed_at, "200")
    first_503_s = watch.first(killed_at, "503")
    after_kill = [(round((at - killed_at) * 1000, 1), answer) for at, answer in watch.changes if at >= killed_at]
    summary: dict = {
        "streams": len(streams),
        "stream_ends": dict(Counter(stream_ends).most_common()),
        "stream_documents": {"min": min(s.documents for s in streams), "max": max(s.documents for s in streams)},
        "executor_exited_after_ms": _ms(exited_s),
        "ready_poll_ms": args.ready_poll_ms,
        "ready_polls": watch.polls,
        "ready_not_200_after_ms": _ms(red_s),
        "ready_503_after_ms": _ms(first_503_s),
        "ready_changes_after_kill_ms": after_kill,
        "back_serving_after_s": None if back_s is None else round(back_s, 1),
        "memory_mib": {"before": memory_before},
    }
    if back_s is None:
        return summary
    restarts_after = service.gateway_metric("llm_flow_restarts")
    healthy = await one_request(flows.grpc_stream(service.grpc_port), NORMAL, PROMPTS[2], 16, args.request_timeout)
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
        stored_after = (await client.get(f"/v1/predictions/{stored['id']}")).json()
        running_after = (await client.get(f"/v1/predictions/{running['id']}")).json()
    summary.update(
        restarts={"before": restarts_before, "after": restarts_after},
        healthy_after=healthy.outcome.startswith(COMPLETED),
        predictions={
            "stored": {"status": stored["status"], "read_back_whole": stored_after == stored},
            "running": {
                "status_at_the_kill": running["status"], "outputs_at_the_kill": len(running["output"]),
                "status": running_after.get("status"), "error_code": running_after.get("error_code"),
                "error": running_after.get("error"), "outputs": len(running_after.get("output") or []),
            },
            # A prediction is lost when it is gone (404) or stuck: not ended after the restart.
            "lost": sum(1 for p in (stored_after, running_after) if "status" not in p or not ended(p)),
        },
    )
    summary["memory_mib"]["after"] = memory_mib(service)
    return summary


async def all_cases(args: argparse.Namespace, service: Service) -> tuple[dict, dict, dict]:
    """The mixed load, then the slow bodies, then the kill -9 (last: it replaces the flow's processes)."""
    summary = await soak(args, service)
    slow_body = await slow_body_case(args, service)
    kill_9 = await kill_case(args, service)
    return summary, slow_body, kill_9


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    s, settings, code = result["summary"], result["settings"], result["code"]
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
        f"- code: commit {code['commit']}"
        + (f", with uncommitted changes to {len(code['uncommitted'])} paths ({', '.join(code['uncommitted'][:8])}"
           f"{', ...' if len(code['uncommitted']) > 8 else ''})" if code["uncommitted"] else ", no uncommitted change"),
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
        *slow_body_markdown(result["slow_body"]),
        *kill_markdown(result["kill_9"], result["settings"]),
    ]
    return "\n".join(lines)


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _latencies(figures: dict, digits: int = 0) -> str:
    return (f"{_fmt(figures['p50_ms'], digits)} / {_fmt(figures['p95_ms'], digits)} / "
            f"{_fmt(figures['max_ms'], digits)} ms ({figures['n']})")


def _memory(memory: dict, name: str) -> str:
    after = memory.get("after", {}).get(name)
    return f"{memory['before'][name]:.0f} / {'–' if after is None else f'{after:.0f}'} MiB"


def slow_body_markdown(case: dict) -> list[str]:
    lifetime = case["attack_connection_lifetime_s"]
    completion, ready = case["probes"][PROBE], case["probes"][READY_PROBE]
    ended_by = ", ".join(f"{how}: {n}" for how, n in case["attack_connections_ended_by"].items()) or "none"
    return [
        "## Slow bodies",
        "",
        f"{case['connections']} connections each announce a {SLOW_BODY_LENGTH:,}-byte body to `POST /v1/completions` "
        "and send it a byte a second, opening a new connection whenever the server ends one (`bench/slow_body.py`, "
        "a process of its own), while a normal client "
        f"sends `{json.dumps(case['probe'])}` there, then `GET /ready` (which the gateway answers alone), each on a "
        f"new connection, one after another {PROBE_PAUSE_S} s apart: {case['rounds']} phases of "
        f"{case['phase_s']:.0f} s under the attack, each between two quiet ones as long (the gateway's default "
        "body_timeout_s and min_body_rate). Per phase, the medians and the cores other processes on the machine used "
        "meanwhile (outside the soak and its flow):",
        "",
        "| phase | " + " | ".join("attacked" if phase["attacked"] else "quiet" for phase in case["phases"]) + " |",
        "|---|" + "---|" * len(case["phases"]),
        "| completion p50 (count) | "
        + " | ".join(f"{_fmt(phase[f'{PROBE}_p50_ms'])} ms ({phase['n']})" for phase in case["phases"]) + " |",
        "| /ready p50 | " + " | ".join(f"{_fmt(phase[f'{READY_PROBE}_p50_ms'], 1)} ms" for phase in case["phases"])
        + " |",
        "| other cores | " + " | ".join(f"{phase['other_cores']:.2f}" for phase in case["phases"]) + " |",
        "",
        "| figure | value |",
        "|---|---|",
        f"| completion p50 / p95 / max (count), quiet phases | {_latencies(completion['quiet'])} |",
        f"| completion p50 / p95 / max (count), attacked phases | {_latencies(completion['attacked'])} |",
        f"| completion p50 under the attack / quiet (target <= {SLOW_BODY_TARGET_RATIO:g}) | "
        f"{completion['p50_ratio']:.2f}: {_verdict(case['within_target'])} |",
        f"| /ready p50 / p95 / max, quiet phases | {_latencies(ready['quiet'], 1)} |",
        f"| /ready p50 / p95 / max, attacked phases | {_latencies(ready['attacked'], 1)} |",
        f"| /ready p50 under the attack / quiet | {ready['p50_ratio']:.2f} |",
        f"| attack connections ended by the server, by its answer | {ended_by} |",
        f"| an attack connection's life p50 / max | {_fmt(lifetime['p50'], 1)} / {_fmt(lifetime['max'], 1)} s |",
        f"| executor RSS before / after | {_memory(case['memory_mib'], 'executor')} |",
        f"| gateway RSS before / after | {_memory(case['memory_mib'], 'gateway')} |",
        "",
    ]


def kill_markdown(case: dict, settings: dict) -> list[str]:
    red = case["ready_not_200_after_ms"]
    answers = ", ".join(f"{answer} at {at:.0f} ms" for at, answer in case["ready_changes_after_kill_ms"])
    back_s = case["back_serving_after_s"]
    documents = case["stream_documents"]
    back = "not within the request timeout" if back_s is None else f"{back_s} s after the kill"
    lines = [
        "## kill -9 of the executor",
        "",
        f"The flow runs under `make serve`'s supervisor (lifecycle/supervisor.py, here with harness's first backoff "
        f"of 0.5 s; `make serve` waits 1 s). While {case['streams']} gRPC streams of up to {KILL_MAX_TOKENS} tokens "
        "run, a finished prediction is stored and another is running, the executor's process gets SIGKILL; "
        f"`GET /ready` is asked every {case['ready_poll_ms']:g} ms from a thread of its own "
        f"({case['ready_polls']} polls in all), each answer's time taken when it arrived.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| how the streams ended ({documents['min']} to {documents['max']} documents each) | "
        f"{', '.join(f'{how} ({n})' for how, n in case['stream_ends'].items())} |",
        f"| the executor's main thread had exited (its memory and sockets go after it) | "
        f"{case['executor_exited_after_ms']:.1f} ms after the kill |",
        f"| /ready's first answer other than 200 (target <= {READY_TARGET_MS:g} ms) | "
        f"{'never' if red is None else f'{red:.1f} ms after the kill'}: "
        f"{_verdict(red is not None and red <= READY_TARGET_MS)} |",
        f"| /ready's answers after the kill | {answers} |",
        f"| serving again (/ready 200), without a person | {back} |",
    ]
    if "predictions" in case:
        stored, running = case["predictions"]["stored"], case["predictions"]["running"]
        lines += [
            f"| the supervisor's restarts (llm_flow_restarts) before / after | "
            f"{_fmt(case['restarts']['before'])} / {_fmt(case['restarts']['after'])} |",
            f"| a normal request after the restart | {'streams' if case['healthy_after'] else 'FAILED'} |",
            f"| the finished prediction ({stored['status']}), read back after the restart | "
            f"{'whole, unchanged' if stored['read_back_whole'] else 'CHANGED'} |",
            f"| the running prediction ({running['status_at_the_kill']}, {running['outputs_at_the_kill']} outputs "
            f"half a second before the kill) after the restart | {running['status']} "
            f"({running['error_code']}, {running['outputs']} outputs): \"{running['error']}\" |",
            f"| predictions lost (gone, or not ended after the restart) | {case['predictions']['lost']} |",
        ]
    lines += [
        f"| executor RSS before / after (the new process) | {_memory(case['memory_mib'], 'executor')} |",
        f"| gateway RSS before / after (the new process) | {_memory(case['memory_mib'], 'gateway')} |",
        "",
    ]
    return lines


def code_state(outputs: list[Path]) -> dict:
    """The commit measured, and the paths that differ from it (several people share a checkout: a run can include
    work in progress), the soak's own outputs left out."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    ours = {os.path.relpath(path, ROOT) for path in outputs}
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line[3:] not in ours]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": changed}


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
    code = code_state([args.output, args.json])
    log(f"starting the flow ({args.model}) under the supervisor")
    with serve(flows.LogDirs(), "soak", uses_with, model_name=args.model, supervised=True) as service:
        summary, slow_body, kill_9 = asyncio.run(all_cases(args, service))
    machine["load_average_at_end"] = os.getloadavg()
    result = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "code": code,
        "summary": summary,
        "slow_body": slow_body,
        "kill_9": kill_9,
        "json": os.path.relpath(args.json, ROOT),
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.output.write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {args.output} and {args.json}")
    recovered = kill_9.get("healthy_after") and kill_9["predictions"]["lost"] == 0
    return 0 if summary["unexpected"] == 0 and summary["healthy_after"] and recovered else 1


if __name__ == "__main__":
    sys.exit(main())
