"""A slot KV cache: per layer one buffer [slots, 2 * kv_heads, capacity, head_dim], the K heads then the V heads
of each slot, each head's positions contiguous; each request owns a slot.

Why head-major: a decode step's attention reads, for every row and KV head, that head's keys and then its
values at every cached position. Contiguous, each is one sequential stream the hardware prefetcher follows;
position-major ([slots, capacity, 2 * kv_heads, head_dim], the QKV output's own order, written with one
index_copy_) made them strided pieces of 256 bytes, and the 16-row step's attention ran at 5-6 GB/s of cache on
the 2-core EPYC. Measured there, bfloat16-avx2 decode step, median of 15, old and new layout interleaved twice:
16 rows at 128 cached positions 63.5, 60.3 -> 58.8, 53.4 ms; at 400 positions 93.7, 88.3 -> 75.6, 68.6 ms (the
attention kernel's software prefetch, which the strided layout needed, no longer changes anything and went).
A step writes its tokens' K and V heads with one index_put_ per layer (the AVX2 precisions' decode steps write
theirs in C: engine/fast/stack.py). Attention reads K and V as views: SDPA's output is bitwise the same as from
contiguous buffers.

A prefill writes its chunk at the chunk's positions, a decode step one position per row: nothing is
concatenated or re-padded per step. The running rows always fill slots 0..running-1, so a decode step reads
its keys as a slice of the buffers, never a gather; a row that leaves is replaced by the last running row
(one row copy). Rows being prefilled take free slots above the running ones (usually the next ones, so
joining moves nothing).

Capacity (positions per slot) grows by doubling up to max_len as rows grow: 32 rows x 4096 positions of
SmolLM2 in float32 would hold 6 GB from the start. Positions past a row's length hold stale but finite values
that the mask hides.
"""

from __future__ import annotations

import torch

from engine.fast.hugepages import Arena
from engine.fast.model import Shape, StepInputs

INITIAL_CAPACITY = 256


class SlotCache:
    def __init__(self, shape: Shape, max_rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.max_rows, self.max_len = shape, max_rows, max_len
        self.device, self.dtype = device, dtype
        # One slot more than max_rows: joining rows swap through it when their target slot is taken.
        self.slots = max_rows + 1
        self.capacity = 0
        self.kv: list[torch.Tensor] = []  # per layer, [slots, 2 * kv_heads, capacity, head_dim]
        self.reserve(min(INITIAL_CAPACITY, max_len))
        self.prefix: list[torch.Tensor] = []  # per layer, [2 * kv_heads, prefix length, head_dim]
        self.clear()

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def clear(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.owner: list[str | None] = [None] * self.slots
        self.lengths: list[int] = [0] * self.slots  # cached positions per slot
        self.running = 0  # rows in slots 0..running-1 decode together

    @property
    def prefix_length(self) -> int:
        return self.prefix[0].shape[1] if self.prefix else 0

    def allocate(self, request_id: str, prefix_length: int) -> int:
        """A free slot for a new row, holding the first prefix_length positions of the shared prefix."""
        if request_id in self.slot_of:
            raise ValueError(f"request {request_id!r} already has a row")
        if len(self.slot_of) >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        if prefix_length > self.prefix_length:
            raise ValueError(f"a prefix of {prefix_length} tokens was asked, {self.prefix_length} are cached")
        slot = self.owner.index(None, self.running)
        self.owner[slot], self.slot_of[request_id] = request_id, slot
        self.lengths[slot] = prefix_length
        for kv, prefix in zip(self.kv, self.prefix if prefix_length else []):
            kv[slot, :, :prefix_length] = prefix[:, :prefix_length]
        return slot

    def join(self, request_ids: list[str]) -> None:
        """Prefilled rows start decoding: move each into the slot after the running ones."""
        for request_id in request_ids:
            target = self.running
            occupant = self.owner[target]
            if occupant != request_id:
                if occupant is not None:  # another row still being prefilled: out of the way, to a free slot
                    self._move(target, self.owner.index(None, target + 1))
                self._move(self.slot_of[request_id], target)
            self.running += 1

    def free(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is None:
            return
        self.owner[slot] = None
        self.lengths[slot] = 0
        if slot < self.running:
            self.running -= 1
            if slot != self.running:  # keep the running rows contiguous: the last one takes the hole
                self._move(self.running, slot)

    def _move(self, source: int, target: int) -> None:
        length = self.lengths[source]
        for kv in self.kv:
            kv[target, :, :length] = kv[source, :, :length]
        request_id = self.owner[source]
        assert request_id is not None, f"slot {source} has no row to move"
        self.owner[target], self.owner[source] = request_id, None
        self.lengths[target], self.lengths[source] = length, 0
        self.slot_of[request_id] = target

    # -- tensors -------------------------------------------------------------------------------------------

    def reserve(self, length: int) -> None:
        """Room for `length` positions in every slot: grow by doubling (copying what is cached) when needed."""
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's max_len of {self.max_len}")
        if length <= self.capacity:
            return
        capacity = min(self.max_len, max(length, 2 * self.capacity))
        buffer_shape = (self.slots, 2 * self.shape.kv_heads, capacity, self.shape.head_dim)
        arena = Arena() if self.device.type == "cpu" else None  # huge pages: a step reads every row's cache
        grown = []
        for layer in range(self.shape.layers):
            # zeros, not empty: masked positions must hold finite values (0 x NaN would poison the output)
            if arena is None:
                grown.append(torch.zeros(buffer_shape, device=self.device, dtype=self.dtype))
            else:
                grown.append(arena.zeros(buffer_shape, self.dtype))
            if self.capacity:
                grown[-1][:, :, : self.capacity] = self.kv[layer]
        self.kv, self.capacity = grown, capacity

    def zero(self) -> None:
        """After a failed step: whatever it wrote (NaN included) must not leak into the next rows."""
        for kv in self.kv:
            kv.zero_()

    def set_prefix(self, slot: int, length: int) -> None:
        """Keep the first `length` positions of `slot` as the shared prefix."""
        self.prefix = [kv[slot, :, :length].clone() for kv in self.kv]

    def write(self, layer: int, step: StepInputs, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's real tokens' K and V heads (kv: [rows, tokens, 2 * kv_heads, head_dim], a view of the
        QKV output) at their slots and positions (step.write_at) and return the rows' keys and values up to
        step.attended positions, [rows, kv_heads, attended, head_dim] (views when the rows are a slice)."""
        kv = kv.reshape(-1, 2 * self.shape.kv_heads, self.shape.head_dim)
        if step.real_tokens is not None:
            kv = kv.index_select(0, step.real_tokens)
        buffer = self.kv[layer]
        slots, positions = step.write_at
        buffer[slots, :, positions] = kv
        if isinstance(step.rows, slice):
            rows = buffer[step.rows, :, : step.attended]
        else:
            rows = buffer[:, :, : step.attended].index_select(0, step.rows)
        heads = self.shape.kv_heads
        return rows[:, :heads], rows[:, heads:]
