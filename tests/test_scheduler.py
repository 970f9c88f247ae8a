"""The scheduler's policy, without a model (as vLLM tests its v1 scheduler): admission order, packing prompts into
the prefill budget, chunking a long prompt, the prefix cache's blocks, prefill-first within the pause bound,
cancellation in every state, and what a failed step leaves."""

import ast
from pathlib import Path

from engine.config import EngineConfig
from engine.plan import StepPlan
from engine.prefix_cache import PrefixCache
from engine.request import Consumer, Request, SamplingParams
from engine.scheduler import Scheduler

BLOCK = 4
PREFIX = tuple(range(1, 2 * BLOCK + 1))  # two blocks' worth


def request(request_id: str, prompt_len: int, prefix: tuple[int, ...] = ()) -> Request:
    prompt = list(prefix) + [100 + i for i in range(prompt_len - len(prefix))]
    return Request(request_id, prompt, SamplingParams(max_tokens=8), Consumer(lambda output: None))


def scheduler(prefix_cache: PrefixCache | None = None, **config) -> Scheduler:
    config = {"max_running": 4, "prefill_chunk": 16, "max_decode_pause_s": 0.4, **config}
    return Scheduler(EngineConfig(**config), prefix_cache)


def run(s: Scheduler, now: float, finished: tuple[str, ...] = ()) -> StepPlan:
    """One step: plan, then report that it ran (with `finished` rows done)."""
    plan, _ = s.schedule(now)
    s.update(plan, finished, now)
    return plan


def test_waiting_prompts_that_fit_the_budget_are_prefilled_together_in_arrival_order():
    s = scheduler()
    for rid, length in [("a", 5), ("b", 3), ("c", 4), ("d", 6)]:
        s.add(request(rid, length))
    plan, _ = s.schedule(now=0.0)
    # Padded to the longest: a+b+c take 3 x 5 = 15 tokens; d would make 4 x 6 = 24 > 16.
    assert plan.prefill is not None and plan.prefill.request_ids == ["a", "b", "c"]
    assert plan.prefill.starts_rows and plan.prefill.completes_prompts and not plan.decode
    assert [c.token_ids for c in plan.prefill.chunks] == [r.prompt_ids for r in s.prefilling]
    assert [r.request_id for r in s.waiting] == ["d"]


def test_a_prompt_too_wide_to_join_waits_while_the_shorter_ones_behind_it_go():
    s = scheduler(max_running=8)
    for rid, length in [("a", 3), ("wide", 12), ("b", 3), ("c", 4)]:
        s.add(request(rid, length))
    # a + wide would pad two rows to 12 (24 > 16); a, b and c take 3 x 4 = 12.
    assert run(s, now=0.0).prefill.request_ids == ["a", "b", "c"]
    assert [r.request_id for r in s.waiting] == ["wide"]
    s.add(request("d", 2))
    # Now the oldest, it goes first, with whatever fits beside it (none here: 2 x 12 > 16).
    assert run(s, now=0.1).prefill.request_ids == ["wide"]
    assert run(s, now=0.2).prefill.request_ids == ["d"]


def test_the_search_for_prompts_that_fit_looks_only_max_running_prompts_ahead():
    s = scheduler(max_running=2, prefill_chunk=16)
    for rid, length in [("a", 2), ("w1", 12), ("w2", 12), ("b", 2)]:
        s.add(request(rid, length))
    # b would fit beside a, but lies past the 2 prompts after the oldest that one group may look at.
    assert run(s, now=0.0).prefill.request_ids == ["a"]
    assert [r.request_id for r in s.waiting] == ["w1", "w2", "b"]


def test_the_group_joins_the_running_batch_and_decodes_every_row():
    s = scheduler()
    s.add(request("a", 5))
    s.add(request("b", 5))
    run(s, now=0.0)
    assert list(s.running) == ["a", "b"] and not s.prefilling
    plan = run(s, now=0.1, finished=("a",))
    assert plan.decode == ["a", "b"] and plan.prefill is None
    assert list(s.running) == ["b"]
    assert run(s, now=0.2).decode == ["b"]


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_and_alone():
    s = scheduler(prefill_chunk=16)
    s.add(request("long", 40))
    s.add(request("short", 4))
    chunks = []
    for step in range(3):
        plan = run(s, now=step * 0.01)
        assert plan.prefill is not None and plan.prefill.request_ids == ["long"]
        chunks.append(
            (
                plan.prefill.chunks[0].start,
                len(plan.prefill.chunks[0].token_ids),
                plan.prefill.starts_rows,
                plan.prefill.completes_prompts,
            )
        )
    assert chunks == [(0, 16, True, False), (16, 16, False, False), (32, 8, False, True)]
    assert list(s.running) == ["long"]
    # The next group: the short prompt, which waited behind the long one.
    assert run(s, now=0.05).prefill.request_ids == ["short"]


def burst_behind_a_running_row(max_decode_pause_s: float, burst: str) -> Scheduler:
    """One row running since t=0, then one 5-token prompt per letter of `burst` arrives (a prefill step each)."""
    s = scheduler(prefill_chunk=5, max_decode_pause_s=max_decode_pause_s)
    s.add(request("running", 5))
    run(s, now=0.0)
    for rid in burst:
        s.add(request(rid, 5))
    return s


def step_kinds(s: Scheduler, times: list[float]) -> list[str]:
    return ["prefill" if run(s, now).prefill else "decode" for now in times]


def test_prefill_goes_first_while_the_running_rows_have_paused_less_than_the_bound():
    s = burst_behind_a_running_row(max_decode_pause_s=0.4, burst="xyz")
    # Within 0.4 s of the running row's last token: the three prompts go first.
    assert step_kinds(s, [0.1, 0.2, 0.3]) == ["prefill", "prefill", "prefill"]
    assert run(s, now=0.35).decode == ["running", "x", "y", "z"]


def test_once_the_pause_is_spent_decode_and_prefill_alternate():
    s = burst_behind_a_running_row(max_decode_pause_s=0.0, burst="xy")
    assert step_kinds(s, [0.1, 0.2, 0.3, 0.4]) == ["decode", "prefill", "decode", "prefill"]


def test_a_full_batch_admits_no_prefill_until_a_row_finishes():
    s = scheduler(max_running=2)
    for rid in "abc":
        s.add(request(rid, 4))
    run(s, now=0.0)
    assert list(s.running) == ["a", "b"]
    assert run(s, now=0.1).decode == ["a", "b"]  # c waits: no free row
    run(s, now=0.2, finished=("a",))
    assert run(s, now=0.3).prefill.request_ids == ["c"]


def test_a_prompt_prefills_only_what_follows_its_cached_blocks_and_stores_its_new_ones():
    cache = PrefixCache(capacity=16, block_size=BLOCK)
    s = scheduler(cache)
    s.add(request("first", 11, PREFIX))
    plan = run(s, now=0.0, finished=("first",))
    (chunk,) = plan.prefill.chunks
    assert (chunk.start, chunk.cached_blocks) == (0, ())
    assert [position for _, position in chunk.stores] == [0, 4]  # its two full blocks; 3 tokens left over
    # After the step the blocks are visible: the next prompt with the same start copies them.
    s.add(request("second", 10, PREFIX))
    s.add(request("other", 6))
    plan = run(s, now=0.1)
    second, other = plan.prefill.chunks
    assert second.cached_blocks == tuple(block for block, _ in chunk.stores)
    assert (second.start, second.token_ids) == (8, [100, 101]) and second.stores == ()
    assert (other.start, other.cached_blocks) == (0, ()) and len(other.stores) == 1
    assert s.running["second"].cached_tokens == 8 and s.running["other"].cached_tokens == 0
    assert (cache.stats.hit_tokens, cache.stats.miss_tokens) == (8, 11 + 2 + 6)


def test_the_last_token_of_a_prompt_is_always_prefilled():
    cache = PrefixCache(capacity=16, block_size=BLOCK)
    s = scheduler(cache)
    s.add(request("a", 8, PREFIX))
    run(s, now=0.0, finished=("a",))
    s.add(request("again", 8, PREFIX))  # exactly its two cached blocks: the second one's tokens are recomputed
    (chunk,) = run(s, now=0.1).prefill.chunks
    assert (chunk.start, len(chunk.cached_blocks), chunk.token_ids) == (4, 1, list(PREFIX[4:]))


def test_the_cached_rest_is_what_counts_against_the_budget():
    cache = PrefixCache(capacity=16, block_size=BLOCK)
    s = scheduler(cache, prefill_chunk=8)
    s.add(request("warm", 10, PREFIX))
    run(s, now=0.0, finished=("warm",))
    for rid in ("x", "y", "z"):
        s.add(request(rid, 10, PREFIX))  # 8 cached, 2 to prefill each: all three fit a budget of 8
    assert run(s, now=0.1).prefill.request_ids == ["x", "y", "z"]


def test_a_chunked_prompt_stores_each_chunk_and_a_failed_prefill_stores_nothing():
    cache = PrefixCache(capacity=16, block_size=BLOCK)
    s = scheduler(cache, prefill_chunk=6)
    s.add(request("long", 13))
    first = run(s, now=0.0)
    assert [position for _, position in first.prefill.chunks[0].stores] == [0]  # tokens 0-5: one full block
    plan, _ = s.schedule(0.1)
    assert [position for _, position in plan.prefill.chunks[0].stores] == [4, 8]  # tokens 0-11
    s.update(plan, ["long"], 0.1, prefill_failed=True)
    assert cache.blocks == 1 and cache.cached_length(request("again", 13).prompt_ids) == 4


def test_a_finished_answer_is_kept_for_the_next_turn_when_the_runner_can_cache_decoded_tokens():
    cache = PrefixCache(capacity=16, block_size=BLOCK)
    s = scheduler(cache)
    s.keep_outputs = True
    s.add(request("turn1", 6, PREFIX[:6]))
    run(s, now=0.0)
    s.running["turn1"].output_ids = [7, 8, 9, 10, 11]  # the last one was sampled, never fed
    plan, _ = s.schedule(0.1)
    s.update(plan, ["turn1"], 0.1)
    assert [position for _, position in s.kept_blocks()["turn1"]] == [4]  # 6 + 4 fed: blocks 0-3 (stored), 4-7
    s.commit_kept()
    next_turn = [*PREFIX[:6], 7, 8, 9, 10, 11, 12]  # the answer resent, then a question
    assert cache.cached_length(next_turn) == 8


def test_cancellation_frees_a_request_in_every_state():
    s = scheduler(prefill_chunk=8, max_decode_pause_s=0.0)
    s.add(request("running", 4))
    run(s, now=0.0)
    s.add(request("long", 20))  # prefilled in chunks of 8
    s.add(request("waiting", 4))
    run(s, now=0.1)  # decode: the pause is spent
    run(s, now=0.2)  # the first chunk of "long"
    assert [r.request_id for r in s.prefilling] == ["long"] and [r.request_id for r in s.waiting] == ["waiting"]
    for rid in ("running", "long", "waiting", "unknown"):
        s.cancel(rid)
    plan, freed = s.schedule(now=0.3)
    assert sorted(plan.freed) == ["long", "running", "waiting"] == sorted(r.request_id for r in freed)
    assert plan.prefill is None and not plan.decode
    assert not s.running and not s.prefilling and not s.waiting and not s.has_work


def test_a_cancelled_row_of_a_prefilling_group_leaves_the_others_prefilling():
    s = scheduler(prefill_chunk=4)
    s.add(request("long", 10))
    run(s, now=0.0)
    s.cancel("long")
    s.add(request("next", 3))
    plan, freed = s.schedule(now=0.1)
    assert plan.freed == ["long"] and plan.prefill.request_ids == ["next"] and plan.prefill.starts_rows


def test_a_failed_step_aborts_the_rows_in_flight_and_keeps_the_waiting_queue():
    s = scheduler(max_running=1)
    s.add(request("running", 4))
    s.add(request("waiting", 4))
    run(s, now=0.0)
    aborted = s.abort_in_flight()
    assert [r.request_id for r in aborted] == ["running"]
    assert run(s, now=0.1).prefill.request_ids == ["waiting"]


def test_rows_whose_first_token_was_their_last_never_join():
    s = scheduler()
    s.add(request("one-token", 4))
    s.add(request("more", 4))
    run(s, now=0.0, finished=("one-token",))
    assert list(s.running) == ["more"]


def test_the_scheduler_needs_no_torch():
    """The policy is plain Python, so it stays testable and readable without a model (imports checked statically:
    importing the engine package itself loads torch)."""
    for module in ("scheduler", "plan", "request", "config", "prefix_cache"):
        tree = ast.parse((Path(__file__).resolve().parent.parent / "engine" / f"{module}.py").read_text())
        runtime_imports = [
            alias.name
            for node in tree.body  # module level only: `if TYPE_CHECKING:` blocks are not imports at run time
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
            if (node.module if isinstance(node, ast.ImportFrom) else alias.name) in {"torch", "transformers"}
        ]
        assert runtime_imports == [], module
