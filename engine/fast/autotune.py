"""Which precision runs a step fastest, measured on this machine at start-up: decode steps as one precision over
1, 4 and 16 rows, prefills as one precision over a lone chat turn and a burst of them.

The answer depends on the CPU and on the size: with AMX or AVX512-BF16 bfloat16 wins everywhere; on an AVX2
CPU bfloat16 is emulated, which still halves the weight traffic of a one-row step (a matrix-vector product is
memory bound) but loses at 16 rows (compute bound). A prefill is compute bound from its first tokens: on an AMX
CPU torch's bfloat16 matmuls (oneDNN on AMX) prefill several times faster than the AVX2 kernels that win its
decode steps. A short measurement answers all of these without guessing from CPU flags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

MEASURED_ROWS = (1, 4, 16)  # decode steps are timed at these row counts
TIMED_STEPS = 2  # after one warm-up step each; the best counts (the host is shared: the best is the least disturbed)
# Prefills are timed at these token counts: one chat turn alone, and a burst of them as the scheduler groups
# them under its default token budget (EngineConfig.prefill_chunk, 192), in rows of PREFILL_ROW_TOKENS where
# the rows allow (prefill_shapes).
MEASURED_PREFILL_TOKENS = (32, 192)
PREFILL_ROW_TOKENS = 32
TIMED_PREFILLS = 1  # a prefill lasts many decode steps: one timed run after the warm-up is steady enough
# A candidate this many times slower than the fastest at one prefill size is not timed at the larger ones: a
# prefill is compute bound, so it would not catch up, and on an AVX2 CPU torch's emulated bfloat16 alone takes
# seconds a large prefill, which timing it there adds to every start-up. Far above the noise of a single run.
PREFILL_DROP_BEYOND = 3.0


def measure(
    candidates: list[str],
    sizes: list[int],
    time_step: Callable[[str, int], object],
    timed: int = TIMED_STEPS,
    drop_beyond: float = math.inf,
) -> dict[tuple[str, int], float]:
    """Seconds per step, best of `timed`, for every candidate at every size (rows of a decode step, tokens of a
    prefill), ascending; a candidate more than `drop_beyond` times slower than the fastest at one size is not
    timed at the next ones. Candidates alternate within a size, so a burst of load on the host hits them alike."""
    timings: dict[tuple[str, int], float] = {}
    for size in sizes:
        for name in candidates:
            time_step(name, size)  # warm-up: first-call allocations and kernel selection
        for _ in range(timed):
            for name in candidates:
                started = time.perf_counter()
                time_step(name, size)
                elapsed = time.perf_counter() - started
                timings[name, size] = min(elapsed, timings.get((name, size), math.inf))
        fastest = min(timings[name, size] for name in candidates)
        candidates = [name for name in candidates if timings[name, size] <= drop_beyond * fastest]
    return timings


def fastest_overall(candidates: list[str], sizes: list[int], timings: dict[tuple[str, int], float]) -> str:
    """The candidate timed at every size whose times, each relative to the fastest at its size, sum least: one
    precision for every size, so that a stream's bits do not depend on the streams beside it (bands by size would
    change a decode step's precision with the batch, a prefill's with the grouping)."""

    def slowdown(name: str) -> float:
        return sum(timings[name, size] / min(t for (_, s), t in timings.items() if s == size) for size in sizes)

    return min((name for name in candidates if all((name, size) in timings for size in sizes)), key=slowdown)


def row_counts(max_rows: int) -> list[int]:
    return sorted({min(rows, max_rows) for rows in MEASURED_ROWS})


def prefill_shapes(max_rows: int, max_len: int) -> dict[int, tuple[int, int]]:
    """{tokens: (rows, tokens a row)} of the prefills timed: MEASURED_PREFILL_TOKENS in rows of
    PREFILL_ROW_TOKENS, fewer and longer rows where max_rows is smaller, shorter ones where max_len is."""
    shapes = {}
    for tokens in MEASURED_PREFILL_TOKENS:
        rows = max(1, min(tokens // PREFILL_ROW_TOKENS, max_rows))
        width = min(-(-tokens // rows), max_len)
        shapes[rows * width] = (rows, width)
    return dict(sorted(shapes.items()))
