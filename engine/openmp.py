"""Keep the engine's loop thread the only long-lived thread that runs torch's CPU kernels in parallel.

Torch's CPU kernels run on OpenMP (libgomp). Every thread that starts a parallel region gets its own team of
worker threads, kept for as long as that thread lives. Once a process manages more OpenMP threads than it has
CPUs, libgomp's workers stop spinning between regions and go to sleep, and each of the hundreds of parallel
regions of a decode step then pays a wake-up. On 2 cores, measured in one process:

- 150 one-row float32 matmuls of a decode step: 18 ms on a thread alone, 31 ms on a second thread once the
  main thread had run one parallel region, 18 ms again when the main thread's work ran on a thread that ended;
- the engine's one-row decode step: 53 ms with the model loaded and the runner built on the main thread,
  38 ms with both done on a thread that ended (one stream: 17.5 -> 25.4 tokens/s).

So torch work outside the loop thread, loading the model and building the runner, runs `on_passing_thread`,
whose team ends with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_passing_thread(work: Callable[[], T], name: str = "llm-setup") -> T:
    """`work()` on a new thread that ends when it returns; its result, or its exception raised here."""
    outcome: dict[str, T] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed to the caller, re-raised there with its own traceback
            failure.append(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome["result"]
