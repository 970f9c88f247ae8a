"""Which requests the next step works on: plain Python, no torch, no model (tested alone in tests/test_scheduler.py).

Each step the engine asks `schedule()` for a StepPlan and reports back with `update()`. A step is one forward:

- rows of cancelled requests are freed first, in whatever state they are (waiting, prefilling, running);
- **prefill**: the oldest waiting prompt, with the next ones that fit the token budget beside it (padded to the
  longest; one that does not fit waits for a later group), or the next chunk of one prompt longer than the
  budget; their rows join the running batch once their prompts are in. A prompt's prefix that the prefix cache
  holds (engine/prefix_cache.py) is copied, not prefilled: only the rest counts against the budget. Each chunk's
  new full blocks go into the prefix cache once the step has run;
- **decode**: one token for every running row.

With prefill work to do, a prefill step follows every decode step, and further prefill steps go first while the
running rows have waited less than `max_decode_pause_s` for their next token (TGI's router and vLLM's v0
scheduler also put prefill first: a waiting client has nothing yet, a running one is mid-answer); past that,
decode and prefill steps alternate.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable

from engine.config import EngineConfig
from engine.plan import PrefillChunk, PrefillPlan, StepPlan
from engine.prefix_cache import Block, PrefixCache, Reservation
from engine.request import Request


class Scheduler:
    def __init__(self, config: EngineConfig, prefix_cache: PrefixCache | None = None) -> None:
        self.config = config
        self.prefix_cache = prefix_cache  # None: every prompt is prefilled whole
        # What this step's plan holds in the prefix cache until update(): the cached blocks its new rows copy,
        # and the blocks its chunks fill.
        self._held: list[Block] = []
        self._reservations: list[Reservation] = []
        # Whether a finished row's answer goes into the prefix cache too (Runner.decoded_kv_is_prefill_kv): a
        # conversation's next turn resends it. Its blocks, reserved by update(), are committed by commit_kept().
        self.keep_outputs = False
        self._kept: dict[str, Reservation] = {}
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

    def update(self, plan: StepPlan, finished: Iterable[str], now: float, prefill_failed: bool = False) -> None:
        """After the plan ran: `finished` rows (their last token came, or they failed) are done with;
        `prefill_failed`: the plan's prefill raised, so the blocks it was to fill hold nothing."""
        finished = set(finished)
        self._settle_prefix_cache(filled=not prefill_failed)
        if plan.prefill is not None:
            for chunk in plan.prefill.chunks:
                request = self._prefilling_request(chunk.request_id)
                if request is not None:
                    request.prefilled = chunk.start + len(chunk.token_ids)
            if plan.prefill.completes_prompts:
                if not self.running:
                    self._last_decode_at = now  # a fresh batch: its rows just got their first token
                self.running.update((r.request_id, r) for r in self.prefilling if r.request_id not in finished)
                self.prefilling = []
        self._decoded_last = bool(plan.decode)
        if plan.decode:
            self._last_decode_at = now
        for request_id in finished:
            request = self.running.pop(request_id, None)
            if request is not None and self.keep_outputs and self.prefix_cache is not None:
                tokens = request.prompt_ids + request.output_ids[:-1]  # the last token was never fed
                self._kept[request_id] = self.prefix_cache.reserve(tokens, len(tokens))
        self.prefilling = [r for r in self.prefilling if r.request_id not in finished]

    def abort_in_flight(self) -> list[Request]:
        """Forget the prefilling and running requests (a step failed: their rows are gone); return them. The
        waiting ones are untouched and start afresh."""
        self._settle_prefix_cache(filled=False)
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
        """The next chunk of the group being prefilled, or a new group (_new_group) in free rows. The oldest
        prompt always goes, chunked when its uncached rest alone exceeds the budget."""
        budget = self.config.prefill_chunk
        first = not self.prefilling
        cached: dict[str, tuple[int, ...]] = {}
        if first:
            self.prefilling = self._new_group(budget, now)
            cached = {r.request_id: self._cached_prefix(r) for r in self.prefilling}
        chunks = []
        for request in self.prefilling:
            start = request.prefilled
            end = min(start + budget, request.prompt_len)
            chunks.append(
                PrefillChunk(
                    request.request_id,
                    request.prompt_ids[start:end],
                    start,
                    cached.get(request.request_id, ()),
                    self._stores(request, end),
                )
            )
        joins = all(chunk.start + len(chunk.token_ids) == r.prompt_len for chunk, r in zip(chunks, self.prefilling))
        return PrefillPlan(chunks, starts_rows=first, completes_prompts=joins)

    def _new_group(self, budget: int, now: float) -> list[Request]:
        """The oldest waiting prompt, and after it the next ones whose uncached rest fits beside it, in arrival
        order: one that does not fit (a conversation whose cache missed, padding every row to its length) stays
        at its place, and goes first once it is the oldest. Only the next max_running prompts are looked at, so
        a long queue costs a bounded scan."""
        free_rows = self.config.max_running - len(self.running)
        group: list[Request] = []
        width = 0
        for request in itertools.islice(self.waiting, self.config.max_running + 1):
            if len(group) == free_rows or (group and width * (len(group) + 1) > budget):
                break  # no row more fits, however short
            rest = request.prompt_len - self._cached_length(request)
            if group and max(width, rest) * (len(group) + 1) > budget:
                continue
            group.append(request)
            width = max(width, rest)
        chosen = {id(request) for request in group}
        self.waiting = deque(request for request in self.waiting if id(request) not in chosen)
        for request in group:
            request.scheduled_at = now
        return group

    # ---- the prefix cache ----

    def _cached_length(self, request: Request) -> int:
        return 0 if self.prefix_cache is None else self.prefix_cache.cached_length(request.prompt_ids)

    def _cached_prefix(self, request: Request) -> tuple[int, ...]:
        """The blocks holding the start of a request's prompt, held for this step; the request starts after them."""
        if self.prefix_cache is None:
            return ()
        blocks = self.prefix_cache.lookup(request.prompt_ids)
        self._held += blocks
        request.prefilled = request.cached_tokens = len(blocks) * self.prefix_cache.block_size
        return tuple(block.id for block in blocks)

    def _stores(self, request: Request, end: int) -> tuple[tuple[int, int], ...]:
        """Blocks of prompt_ids[:end] the prefix cache lacks, to fill from the row after this step's chunk."""
        if self.prefix_cache is None:
            return ()
        reservation = self.prefix_cache.reserve(request.prompt_ids, end)
        self._reservations.append(reservation)
        return tuple(reservation.writes)

    def kept_blocks(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """The rows finished by the last update() whose tokens the runner copies into the prefix cache as it
        frees them: per row, (block, first position). Then commit_kept()."""
        return {request_id: tuple(reservation.writes) for request_id, reservation in self._kept.items()}

    def commit_kept(self) -> None:
        if self.prefix_cache is not None:
            for reservation in self._kept.values():
                self.prefix_cache.commit(reservation)
        self._kept = {}

    def _settle_prefix_cache(self, filled: bool) -> None:
        """The step is over: its copied blocks are released, the blocks it filled committed (or dropped)."""
        if self.prefix_cache is None:
            return
        for reservation in self._kept.values():  # not copied: their rows are gone
            self.prefix_cache.discard(reservation)
        self._kept = {}
        self.prefix_cache.release(self._held)
        for reservation in self._reservations:
            if filled:
                self.prefix_cache.commit(reservation)
            else:
                self.prefix_cache.discard(reservation)
        self._held, self._reservations = [], []

    def _prefilling_request(self, request_id: str) -> Request | None:
        return next((r for r in self.prefilling if r.request_id == request_id), None)
