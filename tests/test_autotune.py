"""engine/fast/autotune.py without a model: which candidates are timed at which sizes, and the one chosen."""

from __future__ import annotations

import math
from collections.abc import Callable

from engine.fast import autotune


class FakeClock:
    """time.perf_counter for autotune: each timed step advances it by the step's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def timed_steps(monkeypatch, cost) -> tuple[list[tuple[str, int]], Callable[[str, int], None]]:
    """The calls a measurement makes, and a step whose time is `cost(name, size)` on a fake clock."""
    clock = FakeClock()
    monkeypatch.setattr(autotune, "time", clock)
    calls: list[tuple[str, int]] = []

    def step(name: str, size: int) -> None:
        calls.append((name, size))
        clock.now += cost(name, size)

    return calls, step


def test_a_candidate_far_slower_at_one_size_is_not_timed_at_the_larger_ones(monkeypatch):
    # 'emulated' is 5x slower at 32 tokens; 'packed' and 'plain' are within 2x of each other and swap at 192.
    costs = {("plain", 32): 0.10, ("packed", 32): 0.07, ("emulated", 32): 0.35}
    costs |= {("plain", 192): 0.30, ("packed", 192): 0.40}
    calls, step = timed_steps(monkeypatch, lambda name, size: costs.get((name, size), 1.0))
    timings = autotune.measure(["plain", "packed", "emulated"], [32, 192], step, timed=1, drop_beyond=2.0)
    assert ("emulated", 192) not in calls
    assert set(timings) == {("plain", 32), ("packed", 32), ("emulated", 32), ("plain", 192), ("packed", 192)}
    assert math.isclose(timings["plain", 192], 0.30)
    # 'packed' wins at 32 tokens, 'plain' at 192; one precision takes the least slowdown summed over the sizes
    # ('packed' 1.0 + 1.33, 'plain' 1.43 + 1.0), and never the candidate dropped at 32 tokens.
    assert autotune.fastest_overall(["plain", "packed", "emulated"], [32, 192], timings) == "packed"


def test_without_a_limit_every_candidate_is_timed_at_every_size(monkeypatch):
    calls, step = timed_steps(monkeypatch, lambda name, size: {"a": 1.0, "b": 9.0}[name] * size)
    timings = autotune.measure(["a", "b"], [1, 4, 16], step)
    # one warm-up and TIMED_STEPS timed steps per candidate and size, candidates alternating
    assert len(calls) == 3 * 2 * (1 + autotune.TIMED_STEPS)
    assert calls[:4] == [("a", 1), ("b", 1), ("a", 1), ("b", 1)]
    assert autotune.fastest_overall(["a", "b"], [1, 4, 16], timings) == "a"


def test_prefills_are_timed_at_the_same_token_counts_whatever_rows_the_engine_allows():
    """A prefill of prefill_chunk tokens comes as one long row where only one row fits: it must be timed too."""
    assert autotune.prefill_shapes(max_rows=32, max_len=4096) == {32: (1, 32), 192: (6, 32)}
    assert autotune.prefill_shapes(max_rows=4, max_len=4096) == {32: (1, 32), 192: (4, 48)}
    assert autotune.prefill_shapes(max_rows=1, max_len=4096) == {32: (1, 32), 192: (1, 192)}
    # rows no longer than the model's context
    assert autotune.prefill_shapes(max_rows=32, max_len=20) == {20: (1, 20), 120: (6, 20)}
