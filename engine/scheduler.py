"""Which requests the next step works on: plain Python, no torch, no model (tested alone in tests/test_scheduler.py).

Each step the engine asks `schedule()` for a StepPlan and reports back with `update()`. A step is one forward:

- rows of cancelled requests are freed first, in whatever state they are (waiting, prefilling, running);
- **prefill**: the oldest waiting prompts that fit the token budget side by side (padded to the longest) go
  together, or the next chunk of one prompt longer than the budget; their rows join the running batch once their
  prompts are in;
- **decode**: one token for every running row.

With prefill work to do, a prefill step follows every decode step, and further prefill steps go first while the
running rows have waited less than `max_decode_pause_s` for their next token (TGI's router and vLLM's v0
scheduler also put prefill first: a waiting client has nothing yet, a running one is mid-answer); past that,
decode and prefill steps alternate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from engine.config import EngineConfig
from engine.plan import PrefillChunk, PrefillPlan, StepPlan
from engine.request import Request


class Scheduler:
    def __init__(self, config: EngineConfig, shared_prefix: Sequence[int] = ()) -> None:
        self.config = config
        self.shared_prefix = tuple(shared_prefix)  # token ids whose cache the runner holds (runner.start)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # one group at a time; split over steps only when it is one long prompt
        self.running: dict[str, Request] = {}  # in the order the rows joined
        self._cancelled: set[str] = set()
        self._last_decode_at = 0.0  # when the running rows last got a token
        self._decoded_last = False  # whether the last step was a decode step

    # ---- what the engine tells the scheduler ----

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: str) -> None:
        """Free the request at the next step, whatever its state; an id no longer scheduled is ignored."""
        self._cancelled.add(request_id)

    def update(self, plan: StepPlan, finished: Iterable[str], now: float) -> None:
        """After the plan ran: `finished` rows (their last token came, or they failed) are done with."""
        finished = set(finished)
        if plan.prefill is not None:
            for chunk in plan.prefill.chunks:
                request = self._prefilling_request(chunk.request_id)
                if request is not None:
                    request.prefilled = chunk.start + len(chunk.token_ids)
            if plan.prefill.joins:
                if not self.running:
                    self._last_decode_at = now  # a fresh batch: its rows just got their first token
                self.running.update((r.request_id, r) for r in self.prefilling if r.request_id not in finished)
                self.prefilling = []
        self._decoded_last = bool(plan.decode)
        if plan.decode:
            self._last_decode_at = now
        for request_id in finished:
            self.running.pop(request_id, None)
        self.prefilling = [r for r in self.prefilling if r.request_id not in finished]

    def abort_in_flight(self) -> list[Request]:
        """Forget the prefilling and running requests (a step failed: their rows are gone); return them. The
        waiting ones are untouched and start afresh."""
        aborted = self.prefilling + list(self.running.values())
        self.prefilling, self.running = [], {}
        return aborted

    def abort_all(self) -> list[Request]:
        """Forget every request (shutdown); return them."""
        aborted = list(self.waiting) + self.abort_in_flight()
        self.waiting.clear()
        return aborted

    # ---- the plan ----

    @property
    def num_running(self) -> int:
        """Rows in the batch: running and prefilling."""
        return len(self.running) + len(self.prefilling)

    @property
    def has_work(self) -> bool:
        return bool(self._cancelled or self.waiting or self.prefilling or self.running)

    def schedule(self, now: float) -> tuple[StepPlan, list[Request]]:
        """The next step's plan, and the requests it frees (cancelled ones), which the engine ends."""
        freed = self._take_cancelled()
        plan = StepPlan(freed=[r.request_id for r in freed])
        if self._prefill_goes_first(now):
            plan.prefill = self._prefill_plan(now)
        elif self.running:
            plan.decode = list(self.running)
        return plan, freed

    def _take_cancelled(self) -> list[Request]:
        cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return []
        freed = [r for r in self.waiting if r.request_id in cancelled]
        self.waiting = deque(r for r in self.waiting if r.request_id not in cancelled)
        freed += [r for r in self.prefilling if r.request_id in cancelled]
        self.prefilling = [r for r in self.prefilling if r.request_id not in cancelled]
        freed += [self.running.pop(rid) for rid in cancelled & self.running.keys()]
        return freed

    def _prefill_goes_first(self, now: float) -> bool:
        has_prefill_work = bool(self.prefilling) or (bool(self.waiting) and len(self.running) < self.config.max_running)
        if not has_prefill_work:
            return False
        return not self.running or self._decoded_last or now - self._last_decode_at < self.config.max_decode_pause_s

    def _prefill_plan(self, now: float) -> PrefillPlan:
        """The next chunk of the group being prefilled, or a new group: the oldest waiting prompts that fit the
        budget side by side into free rows. Rows of one group share the cached prefix, or none. The oldest prompt
        always goes, chunked when it alone exceeds the budget."""
        budget = self.config.prefill_chunk
        first = not self.prefilling
        if first:
            self.prefilling = self._new_group(budget, now)
        chunks = [
            PrefillChunk(r.request_id, r.prompt_ids[r.prefilled : r.prefilled + budget], r.prefilled)
            for r in self.prefilling
        ]
        joins = all(chunk.start + len(chunk.token_ids) == r.prompt_len for chunk, r in zip(chunks, self.prefilling))
        return PrefillPlan(chunks, first=first, joins=joins)

    def _new_group(self, budget: int, now: float) -> list[Request]:
        free_rows = self.config.max_running - len(self.running)
        skip = self._prefix_len(self.waiting[0])
        group: list[Request] = []
        width = 0
        for request in self.waiting:
            rest = request.prompt_len - skip
            if len(group) == free_rows or self._prefix_len(request) != skip:
                break
            if group and max(width, rest) * (len(group) + 1) > budget:
                break
            group.append(request)
            width = max(width, rest)
        for request in group:
            self.waiting.popleft()
            request.prefilled = skip
            request.scheduled_at = now
        return group

    def _prefix_len(self, request: Request) -> int:
        """Tokens of the prompt the shared prefix already holds (at least one token must remain to prefill)."""
        prefix = self.shared_prefix
        if prefix and request.prompt_len > len(prefix) and tuple(request.prompt_ids[: len(prefix)]) == prefix:
            return len(prefix)
        return 0

    def _prefilling_request(self, request_id: str) -> Request | None:
        return next((r for r in self.prefilling if r.request_id == request_id), None)
