"""Which precision runs a decode step fastest, per batch-size band, measured on this machine at start-up.

The answer depends on the CPU and on the batch: with AMX or AVX512-BF16 bfloat16 wins everywhere; on an AVX2
CPU bfloat16 is emulated, which still halves the weight traffic of a one-row step (a matrix-vector product is
memory bound) but loses 2x at 16 rows (compute bound). A short measurement answers both without guessing
from CPU flags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

MEASURED_ROWS = (1, 4, 16)  # a band per measured count, up to the geometric midpoint with the next one
TIMED_STEPS = 2  # after one warm-up step each; the best counts (the host is shared: the best is the least disturbed)


def measure(
    candidates: list[str], row_counts: list[int], time_step: Callable[[str, int], object]
) -> dict[tuple[str, int], float]:
    """Seconds per decode step, best of TIMED_STEPS, for every candidate at every row count. Candidates
    alternate within a row count, so a burst of load on the host hits them alike."""
    timings: dict[tuple[str, int], float] = {}
    for rows in row_counts:
        for name in candidates:
            time_step(name, rows)  # warm-up: first-call allocations and kernel selection
        for _ in range(TIMED_STEPS):
            for name in candidates:
                started = time.perf_counter()
                time_step(name, rows)
                elapsed = time.perf_counter() - started
                timings[name, rows] = min(elapsed, timings.get((name, rows), math.inf))
    return timings


def bands(
    candidates: list[str], row_counts: list[int], timings: dict[tuple[str, int], float], max_rows: int
) -> list[tuple[int, str]]:
    """[(most rows, precision)], ascending: the fastest candidate at each measured count serves the rows up to
    the geometric midpoint with the next count; neighbouring bands with the same winner merge."""
    result: list[tuple[int, str]] = []
    for index, rows in enumerate(row_counts):
        winner = min(candidates, key=lambda name: timings[name, rows])
        upper = int(math.sqrt(rows * row_counts[index + 1])) if index + 1 < len(row_counts) else max_rows
        if result and result[-1][1] == winner:
            result[-1] = (upper, winner)
        else:
            result.append((upper, winner))
    return result


def row_counts(max_rows: int) -> list[int]:
    return sorted({min(rows, max_rows) for rows in MEASURED_ROWS})
