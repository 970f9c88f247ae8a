"""`python -m bench.predictions_soak [--duration 120] [--model embedded] [--clients 8] [--ttl 30] [--redis]`

A sustained load of predictions (/v1/predictions) against a real flow (the service's gateway and one executor, on
the embedded model by default), to measure the gateway's memory while predictions are created, watched, cancelled,
left alone and expire. `--clients` steady clients each loop over:

  poll      create, then long-poll with offsets to the end; the joined output must equal the polled texts
  resume    create, read the event stream, drop it after a few tokens, resume with Last-Event-ID: ids contiguous
  cancel    create a long one, wait for its first token, cancel: status canceled
  orphan    create and never look at it again: it runs to its end unobserved, then expires

A create refused with 429 (replica full, or every kept prediction running) waits a second. After the load, the
soak waits until the engine is idle, then for the TTL and the store's sweep, and samples the gateway's resident
memory throughout. With `--redis`, the predictions live in a redis-server started for the run.

`--in-process` measures the in-memory store alone instead: `--predictions` finished predictions of `--tokens`
token texts each (a fresh string per token, as the executor's documents bring them), the resident memory they
take, that none is kept after the TTL, and that a second round after the expiry reuses that memory (Python keeps
freed memory for reuse rather than handing it back to the system, so it is growth that would show a leak).

Prints a summary and writes bench/predictions_soak_results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from bench import flows
from gateway.prediction_store import MemoryStore, Prediction, now_iso
from harness.predictions import redis_server, sse_events
from harness.processes import process_listening_on
from harness.service import Service, serve

ROOT = Path(__file__).resolve().parent.parent
MIX = {"poll": 0.4, "resume": 0.3, "cancel": 0.15, "orphan": 0.15}
PROMPTS = ["what is the capital of France ?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a KV cache is in one sentence.", "Tell me a short story about a robot."]


def log(message: str) -> None:
    print(f"[predictions soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Soak:
    def __init__(self, args: argparse.Namespace, service: Service) -> None:
        self.args = args
        self.service = service
        self.random = random.Random(args.seed)
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.ids: list[str] = []

    async def create(self, client: httpx.AsyncClient, max_tokens: int) -> dict | None:
        prompt = f"{self.random.choice(PROMPTS)} (#{len(self.ids)})"
        response = await client.post("/v1/predictions", json={"input": {"prompt": prompt, "max_tokens": max_tokens}})
        if response.status_code == 429:
            self.outcomes["refused 429"] += 1
            await asyncio.sleep(1.0)
            return None
        if response.status_code != 201:
            self.unexpected.append(f"create: HTTP {response.status_code} {response.text[:200]}")
            return None
        prediction = response.json()
        self.ids.append(prediction["id"])
        return prediction

    async def poll(self, client: httpx.AsyncClient) -> None:
        if (prediction := await self.create(client, self.random.choice([16, 32, 64]))) is None:
            return
        texts: list[str] = []
        while True:
            body = (await client.get(prediction["urls"]["get"], params={"offset": len(texts), "wait": 30})).json()
            texts += body["output"]
            if body["status"] not in ("starting", "processing"):
                break
        whole = (await client.get(prediction["urls"]["get"])).json()
        ok = body["status"] == "succeeded" and whole["output"] == texts
        self.record("poll", ok, f"poll {prediction['id']}: {body['status']}, {len(texts)} vs {len(whole['output'])}")

    async def resume(self, client: httpx.AsyncClient) -> None:
        if (prediction := await self.create(client, self.random.choice([32, 64]))) is None:
            return
        ids: list[int] = []
        last = await self.read(client, prediction["urls"]["stream"], {}, ids, drop_after=self.random.randint(1, 8))
        await self.read(client, prediction["urls"]["stream"], {"Last-Event-ID": last}, ids, drop_after=None)
        self.record("resume", ids == list(range(len(ids))), f"resume {prediction['id']}: ids {ids[:20]}")

    async def read(self, client: httpx.AsyncClient, url: str, headers: dict[str, str], ids: list[int],
                   drop_after: int | None) -> str:
        """Read the event stream into `ids` (dropping it once `drop_after` outputs arrived); the last event id."""
        last = headers.get("Last-Event-ID", "-1")
        async with client.stream("GET", url, headers=headers) as response:
            async for event in sse_events(response):
                last = event["id"]
                if event["event"] == "output":
                    ids.append(int(event["id"]))
                    if len(ids) == drop_after:
                        break
        return last

    async def cancel(self, client: httpx.AsyncClient) -> None:
        if (prediction := await self.create(client, 256)) is None:
            return
        await client.get(prediction["urls"]["get"], params={"offset": 1, "wait": 60})
        body = (await client.post(prediction["urls"]["cancel"])).json()
        # A prediction may end on its own (eos) before the cancel: succeeded is then right too.
        self.record("cancel", body["status"] in ("canceled", "succeeded"), f"cancel {prediction['id']}: {body}")

    async def orphan(self, client: httpx.AsyncClient) -> None:
        if await self.create(client, self.random.choice([16, 64])) is not None:
            self.outcomes["orphan"] += 1

    def record(self, kind: str, ok: bool, detail: str) -> None:
        self.outcomes[kind if ok else f"{kind} unexpected"] += 1
        if not ok:
            self.unexpected.append(detail)

    async def client(self, deadline: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        async with httpx.AsyncClient(base_url=self.service.url, timeout=self.args.request_timeout) as client:
            while time.monotonic() < deadline:
                kind = self.random.choices(kinds, weights)[0]
                try:
                    await getattr(self, kind)(client)
                except httpx.HTTPError as error:
                    self.unexpected.append(f"{kind}: {error!r}")


async def sample(gateway: psutil.Process, samples: list[dict], started: float, every: float, phase: list[str]) -> None:
    while True:
        samples.append({"t_s": round(time.monotonic() - started, 1), "phase": phase[0],
                        "gateway_rss_mib": round(gateway.memory_info().rss / 2**20, 1)})
        await asyncio.sleep(every)


async def soak(args: argparse.Namespace, service: Service) -> dict:
    gateway = process_listening_on(service.http_port)
    runner = Soak(args, service)
    samples: list[dict] = []
    phase = ["start"]
    started = time.monotonic()
    sampler = asyncio.create_task(sample(gateway, samples, started, args.sample_every, phase))
    rss_start = gateway.memory_info().rss
    phase[0] = "load"
    deadline = time.monotonic() + args.duration
    await asyncio.gather(*(runner.client(deadline) for _ in range(args.clients)))
    phase[0] = "idle"
    while service.running_streams() or service.waiting_streams():
        await asyncio.sleep(0.5)
    rss_after_load = gateway.memory_info().rss
    # The in-memory store sweeps every min(ttl, 30) s; Redis expires keys itself.
    phase[0] = "expiry"
    await asyncio.sleep(args.ttl + min(args.ttl, 30) + 2)
    rss_after_expiry = gateway.memory_info().rss
    sampler.cancel()
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        statuses = Counter([(await client.get(f"/v1/predictions/{id}")).status_code for id in runner.ids[-50:]])
    mib = 2**20
    return {
        "predictions_created": len(runner.ids),
        "outcomes": dict(runner.outcomes),
        "unexpected": len(runner.unexpected),
        "unexpected_details": runner.unexpected[:20],
        "last_50_after_ttl": {str(status): count for status, count in statuses.items()},
        "gateway_rss_mib": {"start": round(rss_start / mib, 1), "after_load": round(rss_after_load / mib, 1),
                            "after_expiry": round(rss_after_expiry / mib, 1),
                            "max_sampled": max(s["gateway_rss_mib"] for s in samples)},
        "samples": samples,
    }


async def store_memory(args: argparse.Namespace) -> dict:
    store = MemoryStore(ttl_s=args.ttl, max_kept=args.predictions)
    await store.start()
    vocabulary = [f" word{i}" for i in range(8000)]
    process = psutil.Process()
    rss_start = process.memory_info().rss
    rng = random.Random(args.seed)

    async def fill(round: int) -> None:
        for number in range(args.predictions):
            prediction = Prediction(id=f"{round}-{number}", model="m", version="m", created_at=now_iso(),
                                    input={"prompt": "x" * 200, "max_tokens": args.tokens})
            await store.create(prediction)
            for index in range(args.tokens):
                await store.append(prediction.id, index, "".join(["", rng.choice(vocabulary)]))  # a new string
            await store.finish(prediction.id, status="succeeded", completed_at=now_iso())

    await fill(1)
    rss_full = process.memory_info().rss
    await asyncio.sleep(args.ttl + min(args.ttl, 30) + 1)
    kept = store.kept
    await fill(2)
    rss_second = process.memory_info().rss
    await store.close()
    mib = 2**20
    return {"predictions": args.predictions, "tokens_each": args.tokens, "kept_after_ttl": kept,
            "rss_mib": {"start": round(rss_start / mib, 1), "full": round(rss_full / mib, 1),
                        "full_again_after_expiry": round(rss_second / mib, 1)},
            "kib_per_prediction": round((rss_full - rss_start) / args.predictions / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predictions_soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120, help="seconds of load (default 120)")
    parser.add_argument("--model", default="embedded", help="embedded (default) or a local model directory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--ttl", type=float, default=30, help="the predictions' ttl_s (default 30)")
    parser.add_argument("--max-kept", type=int, default=200, help="the predictions' max_kept (default 200)")
    parser.add_argument("--redis", action="store_true", help="predictions in a redis-server started for the run")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--sample-every", type=float, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "predictions_soak_results.json")
    parser.add_argument("--in-process", action="store_true", help="measure the in-memory store alone (no flow)")
    parser.add_argument("--predictions", type=int, default=2000, help="--in-process: predictions kept")
    parser.add_argument("--tokens", type=int, default=256, help="--in-process: token texts per prediction")
    args = parser.parse_args(argv)
    if args.in_process:
        summary = asyncio.run(store_memory(args))
        print(json.dumps(summary, indent=2))
        return 0 if summary["kept_after_ttl"] == 0 else 1
    with ExitStack() as stack:
        settings = {"ttl_s": args.ttl, "max_kept": args.max_kept}
        if args.redis:
            settings["redis_url"] = stack.enter_context(redis_server(Path(stack.enter_context(
                tempfile.TemporaryDirectory()))))
        log(f"starting the flow ({args.model}, predictions {settings})")
        service = stack.enter_context(serve(flows.LogDirs(), "predictions-soak", {"model": args.model},
                                            model_name=args.model, gateway_settings={"predictions": settings}))
        summary = asyncio.run(soak(args, service))
    result = {"date": f"{datetime.now():%Y-%m-%d %H:%M}", "settings": vars(args) | {"json": str(args.json)},
              "summary": summary}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in summary.items() if key != "samples"}, indent=2))
    log(f"wrote {args.json}")
    return 0 if summary["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
