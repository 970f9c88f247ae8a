"""The fast path's KV cache: a slot per request, and the prefix cache's blocks.

SlotCache: per layer one buffer [slots, 2 * kv_heads, capacity, head_dim], the K heads then the V heads of each
slot, each head's positions contiguous. Why head-major: a decode step's attention reads, for every row and KV
head, that head's keys and then its values at every cached position; contiguous, each is one sequential stream
the hardware prefetcher follows (position-major, the QKV output's own order, made them strided pieces of 256
bytes). A step writes its tokens' K and V heads with one index_put_ per layer (the C precisions' decode steps
write theirs in C: engine/fast/stack.py). Attention reads K and V as views.

A prefill writes its chunk at the chunk's positions, a decode step one position per row: nothing is
concatenated or re-padded per step. The running rows always fill slots 0..running-1, so a decode step reads
its keys as a slice of the buffers, never a gather; a row that leaves is replaced by the last running row
(one row copy). Rows being prefilled take free slots above the running ones (usually the next ones, so
joining moves nothing). Capacity (positions per slot) grows by doubling up to max_len as rows grow: the longest
context for every row would be held from the start otherwise. Positions past a row's length hold stale but
finite values that the mask hides.

BlockPool: the prefix cache's blocks (engine/prefix_cache.py decides which block holds what), per layer
[2 * kv_heads, blocks * block_size, head_dim]. A new row whose prompt starts with cached blocks gets them copied
into its slot; a prefilled chunk's new full blocks are copied out of the slot. Copying keeps one layout for
every kernel (the C decode stack and attention read one contiguous region per slot); a copy costs a fraction of
a millisecond per block, where computing the block costs a prefill of its tokens. Its storage is allocated
once, untouched (so uncommitted to memory) until blocks are written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from engine.fast.hugepages import Arena
from engine.fast.step import Shape, StepInputs

INITIAL_CAPACITY = 256


def available_memory() -> int:
    """Bytes the machine can still give without swapping (Linux's MemAvailable); unbounded where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return sys.maxsize


class BlockPool:
    """Storage for the prefix cache's blocks: block b holds positions [b * block_size, (b + 1) * block_size)
    of every layer's buffer."""

    def __init__(self, shape: Shape, blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.blocks, self.block_size = shape, blocks, block_size
        self.device, self.dtype = device, dtype
        self._kv: list[torch.Tensor] = []  # per layer, [2 * kv_heads, blocks * block_size, head_dim]; on first use

    @staticmethod
    def block_bytes(shape: Shape, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block holds: every layer's K and V heads at block_size positions."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return shape.layers * 2 * shape.kv_heads * block_size * shape.head_dim * itemsize

    def layers(self) -> list[torch.Tensor]:
        if not self._kv:
            # empty, not zeros: a block is read only after it was written, and untouched pages cost no memory.
            # On CPU in huge pages, as the slots' cache: a full pool is a GB or so, which the prefix copies walk
            # and a killed executor's kernel frees before its sockets close (gateway/health.py's watch).
            size = (2 * self.shape.kv_heads, self.blocks * self.block_size, self.shape.head_dim)
            if self.device.type == "cpu":
                arena = Arena()
                self._kv = [arena.empty(size, self.dtype) for _ in range(self.shape.layers)]
            else:
                self._kv = [torch.empty(size, device=self.device, dtype=self.dtype) for _ in range(self.shape.layers)]
        return self._kv

    def drop(self) -> None:
        """Give the storage back (every block's contents are lost: the prefix cache must have none left)."""
        self._kv = []

    def positions(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The pool positions of these blocks, in order: [len(block_ids) * block_size]."""
        return runs_of(self.block_size, [block_id * self.block_size for block_id in block_ids], self.device)


def runs_of(size: int, starts: Sequence[int], device: torch.device) -> torch.Tensor:
    """The positions start .. start + size - 1 of every start, in order: [len(starts) * size]."""
    return (torch.tensor(starts, device=device)[:, None] + torch.arange(size, device=device)).flatten()


class SlotCache:
    def __init__(
        self,
        shape: Shape,
        max_rows: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        pool: BlockPool | None = None,
    ) -> None:
        self.shape, self.max_rows, self.max_len = shape, max_rows, max_len
        self.device, self.dtype = device, dtype
        self.pool = pool
        # Called when growing would take more memory than the machine has free: whatever can give memory back.
        self.on_memory_pressure: Callable[[], None] | None = None
        # One slot more than max_rows: joining rows swap through it when their target slot is taken.
        self.slots = max_rows + 1
        self.capacity = 0
        self.kv: list[torch.Tensor] = []  # per layer, [slots, 2 * kv_heads, capacity, head_dim]
        self.reserve(min(INITIAL_CAPACITY, max_len))
        self.clear()

    # -- bookkeeping: the one place slots, lengths and the running rows change -------------------------------

    def clear(self) -> None:
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * self.slots
        self._lengths: list[int] = [0] * self.slots  # cached positions per slot
        self._running = 0  # rows in slots 0..running-1 decode together

    @property
    def running(self) -> int:
        """Rows decoding together, in slots 0 .. running - 1."""
        return self._running

    @property
    def rows(self) -> int:
        """Rows with a slot: running and being prefilled."""
        return len(self._slot_of)

    def slot(self, request_id: str) -> int:
        return self._slot_of[request_id]

    def has(self, request_id: str) -> bool:
        return request_id in self._slot_of

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def running_lengths(self) -> list[int]:
        return self._lengths[: self._running]

    def allocate(self, request_id: str, cached_blocks: Sequence[int] = ()) -> int:
        """A free slot for a new row, holding the KV of these pool blocks (its prompt's cached prefix) first."""
        if request_id in self._slot_of:
            raise ValueError(f"request {request_id!r} already has a row")
        if len(self._slot_of) >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        slot = self._owner.index(None, self._running)
        self._owner[slot], self._slot_of[request_id] = request_id, slot
        self._lengths[slot] = 0
        if cached_blocks:
            pool = self._pool()
            length = len(cached_blocks) * pool.block_size
            self.reserve(length)
            positions = pool.positions(cached_blocks)
            for kv, blocks in zip(self.kv, pool.layers()):
                kv[slot, :, :length] = blocks.index_select(1, positions)
            self._lengths[slot] = length
        return slot

    def advance(self, slot: int, tokens: int) -> None:
        """The row in `slot` holds `tokens` more positions (a step wrote them)."""
        self._lengths[slot] += tokens

    def advance_running(self) -> None:
        """Every running row holds one position more (a decode step wrote it)."""
        for slot in range(self._running):
            self._lengths[slot] += 1

    def store(self, request_id: str, writes: Sequence[tuple[int, int]]) -> None:
        """Copy the row's positions into pool blocks: writes are (block id, the block's first position)."""
        if not writes:
            return
        slot, pool = self._slot_of[request_id], self._pool()
        size = pool.block_size
        if max(start for _, start in writes) + size > self._lengths[slot]:
            raise ValueError(f"a block to store reaches past the {self._lengths[slot]} positions of {request_id!r}")
        row_positions = runs_of(size, [start for _, start in writes], self.device)
        pool_positions = pool.positions([block_id for block_id, _ in writes])
        for kv, blocks in zip(self.kv, pool.layers()):
            blocks.index_copy_(1, pool_positions, kv[slot].index_select(1, row_positions))

    def join(self, request_ids: list[str]) -> None:
        """Prefilled rows start decoding: move each into the slot after the running ones."""
        for request_id in request_ids:
            target = self._running
            occupant = self._owner[target]
            if occupant != request_id:
                if occupant is not None:  # another row still being prefilled: out of the way, to a free slot
                    self._move(target, self._owner.index(None, target + 1))
                self._move(self._slot_of[request_id], target)
            self._running += 1

    def free(self, request_id: str) -> None:
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return
        self._owner[slot] = None
        self._lengths[slot] = 0
        if slot < self._running:
            self._running -= 1
            if slot != self._running:  # keep the running rows contiguous: the last one takes the hole
                self._move(self._running, slot)

    def _move(self, source: int, target: int) -> None:
        length = self._lengths[source]
        for kv in self.kv:
            kv[target, :, :length] = kv[source, :, :length]
        request_id = self._owner[source]
        assert request_id is not None, f"slot {source} has no row to move"
        self._owner[target], self._owner[source] = request_id, None
        self._lengths[target], self._lengths[source] = length, 0
        self._slot_of[request_id] = target

    def _pool(self) -> BlockPool:
        if self.pool is None:
            raise ValueError("this cache has no prefix blocks: the prefix cache is off")
        return self.pool

    # -- tensors -------------------------------------------------------------------------------------------

    def reserve(self, length: int) -> None:
        """Room for `length` positions in every slot: grow by doubling (copying what is cached) when needed."""
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's max_len of {self.max_len}")
        if length <= self.capacity:
            return
        capacity = min(self.max_len, max(length, 2 * self.capacity))
        buffer_shape = (self.slots, 2 * self.shape.kv_heads, capacity, self.shape.head_dim)
        needed = self.shape.layers * torch.Size(buffer_shape).numel() * self.kv[0].element_size() if self.kv else 0
        if self.on_memory_pressure is not None and needed > available_memory():
            self.on_memory_pressure()  # the rows' room comes before the prefix cache's
        arena = Arena() if self.device.type == "cpu" else None  # huge pages: a step reads every row's cache
        grown = []
        for layer in range(self.shape.layers):
            # zeros, not empty: masked positions must hold finite values (0 x NaN would poison the output)
            if arena is None:
                grown.append(torch.zeros(buffer_shape, device=self.device, dtype=self.dtype))
            else:
                grown.append(arena.zeros(buffer_shape, self.dtype))
            # What the rows hold, not every slot's whole capacity: the rest stays untouched (and uncommitted).
            for slot, length in enumerate(self._lengths if self.kv else []):
                if length:
                    grown[-1][slot, :, :length] = self.kv[layer][slot, :, :length]
        self.kv, self.capacity = grown, capacity

    def zero(self) -> None:
        """After a failed step: whatever it wrote (NaN included) must not leak into the next rows."""
        for kv in self.kv:
            kv.zero_()

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
        if isinstance(step.slots, slice):
            rows = buffer[step.slots, :, : step.attended]
        else:
            rows = buffer[:, :, : step.attended].index_select(0, step.slots)
        heads = self.shape.kv_heads
        return rows[:, :heads], rows[:, heads:]
