"""Workloads whose prompts repeat, as chat, RAG and agent clients send them: what a prompt cache is for.

- **Multi-turn chat**: `CONVERSATIONS` conversations at once, `TURNS` turns each; every turn resends the whole
  history (the system turn, every question and the answer the server actually gave) plus a new question.
- **Long shared system prompt**: a system prompt of about 1000 tokens (`SYSTEM_DOCUMENT`), first sent once
  alone (nothing cached anywhere yet), then by `CONVERSATIONS` streams at once with distinct questions, twice.

Both run over the OpenAI streaming chat API against every system given, turn by turn interleaved (turn t of
each system before turn t + 1 of any), greedy. Per turn: TTFT p50/p95 at the client, tokens/s over the turn's
wall time, and the prompt tokens each server says it served from its cache (`usage.prompt_tokens_details.
cached_tokens`: the service's prefix cache, llama.cpp's slot prompt cache).

`python -m bench.chat [--replicas 2] [--skip-peer]` runs them alone, starting the service (flow.yml's settings)
and llama.cpp's F32 server itself, and prints the table; `make bench` runs them beside its other rows. With
`--replicas` above 1 the service runs twice, with the gateway's prefix routing off and on, and the table goes to
bench/replicas.md too (BENCHMARKS.md's "Several replicas").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import openai_client, peer, report, service
from bench.flows import LOGS
from bench.load import percentile
from bench.openai_client import Messages, OpenConversation
from harness.processes import free_port

CONVERSATIONS = 16
TURNS = 4
MAX_TOKENS = 64
SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and briefly."
TOPICS = [
    "the water cycle", "how bread rises", "the planets of the solar system", "how bees make honey",
    "why the sky is blue", "how a bicycle stays upright", "the history of chess", "how volcanoes form",
    "how vaccines work", "the life of a butterfly", "how a rainbow forms", "how trains run on rails",
    "why leaves change colour", "how the moon causes tides", "how a compass works", "how coral reefs grow",
]  # fmt: skip
FOLLOW_UPS = ["Tell me more.", "Can you give an example?", "Why does that matter?", "Summarize it in one line."]
CHAT_OPENERS = [f"Explain {topic} to me." for topic in TOPICS]  # each conversation its own from its first word on

# About 1000 tokens of SmolLM2's tokenizer: a support guide every request of an assistant would carry.
_SECTIONS = [
    ("Accounts", "Customers sign in with their email address and a password of at least twelve characters. A "
     "forgotten password is reset from the sign-in page; the link in the email is valid for one hour."),
    ("Orders", "An order can be changed until it is packed, which is usually within two hours of payment. After "
     "that, the customer waits for delivery and returns what they do not want."),
    ("Delivery", "Standard delivery takes three to five working days. Express delivery arrives the next working day "
     "when ordered before noon. Parcels that cannot be delivered wait at the nearest pickup point for ten days."),
    ("Returns", "Items may be returned within thirty days, unused and in their packaging. The refund goes to the "
     "original payment method within five working days of the return being received."),
    ("Payments", "We accept cards, bank transfers and gift cards. A payment that fails twice blocks the order for "
     "one hour, to protect the customer against fraud."),
    ("Warranty", "Electronics carry a two-year warranty. A faulty item is repaired or replaced; if neither is "
     "possible, the customer gets their money back."),
    ("Privacy", "We keep personal data only as long as the law requires. Customers can download or delete their data "
     "from their account settings at any time."),
    ("Gift cards", "Gift cards are valid for three years and can pay for part of an order. They cannot be "
     "exchanged for cash, and a lost gift card can be blocked if the customer still has its number."),
    ("Complaints", "Every complaint gets a case number at once and an answer within two working days. A customer "
     "who is not satisfied with the answer may ask for the case to be reviewed by a manager."),
    ("Tone", "Be friendly and precise. Never promise what the guide does not say. When unsure, offer to pass the "
     "question to a human colleague, who answers within one working day."),
]  # fmt: skip
SYSTEM_DOCUMENT = "You are the support assistant of an online shop. Follow this guide.\n\n" + "\n\n".join(
    f"{number}. {title}. {text} Remember rule {number} whenever a customer asks about {title.lower()}."
    for number, (title, text) in enumerate(_SECTIONS * 2, start=1)
)


@dataclass
class TurnResult:
    system: str
    workload: str  # "multi-turn chat" or "shared system prompt"
    label: str  # "turn 1" ... or "first request", "16 streams, round 1" ...
    requests: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tokens_per_s: float
    prompt_tokens: float | None  # mean per request
    cached_tokens: float | None  # mean per request, as the server reports it
    errors: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    ttft_s: float | None
    text: str
    completion_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    error: str | None


async def ask(open_conversation: OpenConversation, messages: Messages, max_tokens: int) -> Answer:
    started = time.perf_counter()
    answer = Answer(None, "", 0, None, None, None)
    try:
        async for chunk in open_conversation(messages, max_tokens):
            if chunk.error:
                answer.error = chunk.error
            if chunk.completion_tokens is not None:
                answer.completion_tokens, answer.prompt_tokens = chunk.completion_tokens, chunk.prompt_tokens
                answer.cached_tokens = chunk.cached_tokens
            if chunk.text:
                if answer.ttft_s is None:
                    answer.ttft_s = time.perf_counter() - started
                answer.text += chunk.text
    except Exception as error:  # a failed request is counted, not fatal to the turn
        answer.error = repr(error)
    return answer


async def timed_turn(
    system: str, workload: str, label: str, requests: list[Awaitable[Answer]]
) -> tuple[TurnResult, list[Answer]]:
    started = time.perf_counter()
    answers = list(await asyncio.gather(*requests))
    wall = time.perf_counter() - started
    ttfts = [a.ttft_s * 1000 for a in answers if a.ttft_s is not None]

    def mean(values: list[int | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    result = TurnResult(
        system,
        workload,
        label,
        len(answers),
        percentile(ttfts, 50),
        percentile(ttfts, 95),
        sum(a.completion_tokens for a in answers) / wall,
        mean([a.prompt_tokens for a in answers]),
        mean([a.cached_tokens for a in answers]),
        sum(a.error is not None for a in answers),
    )
    return result, answers


async def multi_turn_chat(
    systems: dict[str, OpenConversation], conversations: int, turns: int, max_tokens: int
) -> list[TurnResult]:
    """Every system's conversations, turn t of every system before turn t + 1 of any."""
    histories = {
        name: [
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": CHAT_OPENERS[i % len(CHAT_OPENERS)]},
            ]
            for i in range(conversations)
        ]
        for name in systems
    }
    results = []
    for turn in range(turns):
        for name, open_conversation in systems.items():
            conversation_list = histories[name]
            requests = [ask(open_conversation, messages, max_tokens) for messages in conversation_list]
            result, answers = await timed_turn(name, "multi-turn chat", f"turn {turn + 1}", requests)
            results.append(result)
            for messages, answer in zip(conversation_list, answers):
                messages.append({"role": "assistant", "content": answer.text})
                messages.append({"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
    return results


async def shared_system_prompt(
    systems: dict[str, OpenConversation], streams: int, rounds: int, max_tokens: int
) -> list[TurnResult]:
    """The long system prompt: one request alone, then `rounds` rounds of `streams` at once, each with its own
    question (round r asks the questions rotated by r, so no request repeats)."""

    def messages(question: str) -> Messages:
        return [{"role": "system", "content": SYSTEM_DOCUMENT}, {"role": "user", "content": question}]

    results = []
    for name, open_conversation in systems.items():
        first = [ask(open_conversation, messages("Hello! Who are you?"), max_tokens)]
        results.append((await timed_turn(name, "shared system prompt", "first request", first))[0])
    for round_number in range(1, rounds + 1):
        for name, open_conversation in systems.items():
            # Round and stream numbers first: what repeats between requests is the system prompt alone.
            questions = [
                f"Question {round_number}.{i}: what does the guide say about {TOPICS[i % len(TOPICS)]}?"
                for i in range(streams)
            ]
            requests = [ask(open_conversation, messages(q), max_tokens) for q in questions]
            label = f"{streams} streams, round {round_number}"
            results.append((await timed_turn(name, "shared system prompt", label, requests))[0])
    return results


async def run_workloads(
    ports: dict[str, int], conversations: int, turns: int, rounds: int, max_tokens: int
) -> list[TurnResult]:
    async with openai_client.session() as http:
        systems = {
            name: openai_client.conversation_stream(http, port, service.model_name(port))
            for name, port in ports.items()
        }
        for open_conversation in systems.values():  # warm up: nothing of the workloads' prompts
            await ask(open_conversation, [{"role": "user", "content": "Hi"}], 4)
        results = await multi_turn_chat(systems, conversations, turns, max_tokens)
        results += await shared_system_prompt(systems, conversations, rounds, max_tokens)
    return results


def peer_context(conversations: int, max_tokens: int) -> int:
    """llama.cpp's KV cache for these workloads: each of its slots holds a 4-turn history or the long system
    prompt with its answer (about 1000 + max_tokens tokens), rounded up to llama.cpp's 256."""
    per_slot = 1536 + max_tokens
    return conversations * -(-per_slot // 256) * 256


def find(results: list[TurnResult], system: str, workload: str, label: str) -> TurnResult | None:
    return next((r for r in results if (r.system, r.workload, r.label) == (system, workload, label)), None)


def ratio_target(target: str, ours: TurnResult | None, theirs: TurnResult | None, goal: float) -> dict:
    if ours is None or theirs is None or ours.ttft_p50_ms is None or not theirs.ttft_p50_ms:
        return {"target": target, "measured": "not measured", "passed": None}
    ratio = ours.ttft_p50_ms / theirs.ttft_p50_ms
    measured = f"{ours.ttft_p50_ms:.0f} vs {theirs.ttft_p50_ms:.0f} ms: {ratio:.2f}x"
    return {"target": target, "measured": measured, "passed": ratio <= goal}


def targets(results: list[TurnResult], ours: str, peer_name: str, turns: int, streams: int) -> list[dict]:
    """Issue 22's targets for these workloads, from one run."""
    chat, shared = "multi-turn chat", "shared system prompt"
    goals = [
        ratio_target(
            "multi-turn chat, turn 1: TTFT p50 no worse than llama.cpp's",
            find(results, ours, chat, "turn 1"),
            find(results, peer_name, chat, "turn 1"),
            1.0,
        )
    ]
    for turn in range(2, turns + 1):
        goals.append(
            ratio_target(
                f"multi-turn chat, turn {turn}: TTFT p50 at most 0.5x llama.cpp's",
                find(results, ours, chat, f"turn {turn}"),
                find(results, peer_name, chat, f"turn {turn}"),
                0.5,
            )
        )
    label = f"{streams} streams, round 1"
    goals.append(
        ratio_target(
            f"long shared system prompt, {streams} streams after the first request: TTFT p50 at most 0.5x llama.cpp's",
            find(results, ours, shared, label),
            find(results, peer_name, shared, label),
            0.5,
        )
    )
    mine = find(results, ours, shared, label)
    if mine is not None and mine.ttft_p50_ms is not None:
        goals.append(
            {
                "target": f"long shared system prompt, {streams} streams after the first request: TTFT p50 < 150 ms",
                "measured": f"{mine.ttft_p50_ms:.0f} ms",
                "passed": mine.ttft_p50_ms < 150,
            }
        )
    return goals


def table(results: list[TurnResult]) -> str:
    def num(value: float | None, digits: int = 0) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| workload | system | turn | requests | TTFT p50 (ms) | TTFT p95 (ms) | tok/s | prompt tokens | cached tokens "
        "| errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:  # in the order measured: turn by turn, the systems interleaved
        lines.append(
            f"| {r.workload} | {r.system} | {r.label} | {r.requests} | {num(r.ttft_p50_ms)} | {num(r.ttft_p95_ms)} "
            f"| {num(r.tokens_per_s, 1)} | {num(r.prompt_tokens)} | {num(r.cached_tokens)} | {r.errors} |"
        )
    return "\n".join(lines)


def section(results: list[TurnResult], goals: list[dict]) -> list[str]:
    """BENCHMARKS.md's section for these workloads."""
    marks = {True: "PASS", False: "FAIL", None: "n/a"}
    return [
        "## Prompts that repeat: multi-turn chat and a long shared system prompt (issue 22)",
        "",
        "`bench/chat.py`, over the OpenAI streaming chat API, greedy, turn by turn interleaved between the systems. "
        "Multi-turn chat: conversations at once, each turn resending the history with the answers given. Shared "
        "system prompt: a system prompt of about 1000 tokens, first sent once alone, then by as many streams at "
        "once with distinct questions, in rounds. `cached tokens`: the mean per request of what each server "
        "reports in `usage.prompt_tokens_details.cached_tokens` (llama.cpp: its slots' prompt cache, on by default).",
        "",
        table(results),
        "",
        "| target | measured | result |",
        "|---|---|---|",
        *[f"| {g['target']} | {g['measured']} | {marks[g['passed']]} |" for g in goals],
        "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--conversations", type=int, default=CONVERSATIONS)
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the shared system prompt's streams")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--replicas", type=int, default=1, help="the service's executor replicas")
    parser.add_argument("--skip-peer", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--prefix-cache-mib", type=int, help="the service's prefix_cache_mib (default: flow.yml's)")
    parser.add_argument("--prefill-chunk", type=int, help="the service's prefill_chunk (default: flow.yml's)")
    return parser.parse_args(argv)


# With several replicas, the service twice: the gateway's routing off (Jina's round robin), then on (its default).
ROUTINGS = {"round robin": {"prefix_routing": False}, "prefix routing": {}}
REPLICAS_REPORT = Path(__file__).resolve().parent / "replicas.md"


def services(replicas: int) -> dict[str, dict]:
    """The services measured, by name: their gateway settings."""
    if replicas == 1:
        return {"service": {}}
    return {f"service, {replicas} replicas, {routing}": settings for routing, settings in ROUTINGS.items()}


@contextmanager
def systems_serving(args: argparse.Namespace) -> Iterator[dict[str, int]]:
    """The service as `make serve` runs it (with --replicas: with and without prefix routing) and llama.cpp's F32
    server: their HTTP ports."""
    settings = {"prefix_cache_mib": args.prefix_cache_mib, "prefill_chunk": args.prefill_chunk}
    overrides = {name: value for name, value in settings.items() if value is not None}
    with ExitStack() as stack:
        ports = {
            name: stack.enter_context(
                service.serving(f"chat-service-{i}", overrides, replicas=args.replicas, gateway_settings=settings)
            ).http
            for i, (name, settings) in enumerate(services(args.replicas).items())
        }
        if not args.skip_peer:
            peer.ensure_built()
            ports[LLAMA_F32] = port = free_port()
            context = peer_context(args.conversations, args.max_tokens)
            stack.enter_context(peer.llama_server(peer.f32_gguf(), port, LOGS / "llama-server-chat.log",
                                                  parallel=args.conversations, threads=2, context=context))  # fmt: skip
        yield ports


LLAMA_F32 = "llama.cpp server F32"


def replicas_report(results: list[TurnResult], replicas: int, command: str) -> str:
    """bench/replicas.md: what routing by prefix changes with several replicas (BENCHMARKS.md includes it)."""
    return "\n".join(
        [
            "# Several replicas: prefix-affine routing",
            "",
            f"`{command}` on {time.strftime('%Y-%m-%d')}, {report.cpu_model()}: bench/chat.py's multi-turn chat and "
            f"long shared system prompt on the service with {replicas} executor replicas, twice, turn by turn "
            "interleaved: with the gateway's `prefix_routing: false` (Jina's round robin over the replicas) and with "
            "its default, prefix-affine routing (gateway/routing.py: a conversation's turns go to one replica). "
            "`cached tokens`: the mean per request of `usage.prompt_tokens_details.cached_tokens`. An odd number "
            "of conversations: round robin sends each of an even number, asked in the same order every turn, to "
            "the same replica every turn, which no real mix of clients does.",
            "",
            table(results),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with systems_serving(args) as ports:
        results = asyncio.run(run_workloads(ports, args.conversations, args.turns, args.rounds, args.max_tokens))
    print("\n".join(section(results, targets(results, next(iter(ports)), LLAMA_F32, args.turns, args.conversations))))
    if args.replicas > 1:
        command = "python -m bench.chat " + " ".join(argv if argv is not None else sys.argv[1:])
        REPLICAS_REPORT.write_text(replicas_report(results, args.replicas, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
