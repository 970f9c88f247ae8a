"""A slot KV cache: per layer, K and V buffers [slots, kv_heads, capacity, head_dim]; each request owns a slot.

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

from engine.fast.model import Shape, StepInputs

INITIAL_CAPACITY = 256


class SlotCache:
    def __init__(self, shape: Shape, max_rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.max_rows, self.max_len = shape, max_rows, max_len
        self.device, self.dtype = device, dtype
        # One slot more than max_rows: joining rows swap through it when their target slot is taken.
        self.slots = max_rows + 1
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.reserve(min(INITIAL_CAPACITY, max_len))
        self.prefix_keys: list[torch.Tensor] = []  # [kv_heads, prefix length, head_dim] per layer
        self.prefix_values: list[torch.Tensor] = []
        self.clear()

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def clear(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.owner: list[str | None] = [None] * self.slots
        self.lengths: list[int] = [0] * self.slots  # cached positions per slot
        self.running = 0  # rows in slots 0..running-1 decode together

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys[0].shape[1] if self.prefix_keys else 0

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
        for layer in range(self.shape.layers if prefix_length else 0):
            self.keys[layer][slot, :, :prefix_length] = self.prefix_keys[layer][:, :prefix_length]
            self.values[layer][slot, :, :prefix_length] = self.prefix_values[layer][:, :prefix_length]
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
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
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
        buffer_shape = (self.slots, self.shape.kv_heads, capacity, self.shape.head_dim)
        keys, values = [], []
        for layer in range(self.shape.layers):
            # zeros, not empty: masked positions must hold finite values (0 x NaN would poison the output)
            keys.append(torch.zeros(buffer_shape, device=self.device, dtype=self.dtype))
            values.append(torch.zeros(buffer_shape, device=self.device, dtype=self.dtype))
            if self.capacity:
                keys[-1][:, :, : self.capacity] = self.keys[layer]
                values[-1][:, :, : self.capacity] = self.values[layer]
        self.keys, self.values, self.capacity = keys, values, capacity

    def zero(self) -> None:
        """After a failed step: whatever it wrote (NaN included) must not leak into the next rows."""
        for keys, values in zip(self.keys, self.values):
            keys.zero_()
            values.zero_()

    def set_prefix(self, slot: int, length: int) -> None:
        """Keep the first `length` positions of `slot` as the shared prefix."""
        self.prefix_keys = [keys[slot, :, :length].clone() for keys in self.keys]
        self.prefix_values = [values[slot, :, :length].clone() for values in self.values]

    def write(
        self, layer: int, step: StepInputs, k: torch.Tensor, v: torch.Tensor, attended: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's real tokens' K and V ([rows, tokens, kv_heads, head_dim]) at their positions and
        return the rows' keys and values up to `attended` positions, [rows, kv_heads, attended, head_dim]."""
        k = k.reshape(-1, self.shape.kv_heads, self.shape.head_dim)
        v = v.reshape(-1, self.shape.kv_heads, self.shape.head_dim)
        if step.real_tokens is not None:
            k, v = k[step.real_tokens], v[step.real_tokens]
        keys, values = self.keys[layer], self.values[layer]
        keys[step.write_slots, :, step.write_positions] = k
        values[step.write_slots, :, step.write_positions] = v
        if isinstance(step.rows, slice):
            return keys[step.rows, :, :attended], values[step.rows, :, :attended]
        return keys[:, :, :attended].index_select(0, step.rows), values[:, :, :attended].index_select(0, step.rows)
