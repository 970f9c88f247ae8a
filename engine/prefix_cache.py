"""Automatic prefix caching: which token prefixes have their KV cache kept, in which blocks. Plain data, no torch
(tested alone in tests/test_prefix_cache.py); the runner holds the blocks' tensors and copies them.

A prompt is cut into blocks of `block_size` tokens. A block is keyed by its parent block (the one holding the
tokens before it) and its own tokens, as vLLM chains its block hashes; the key is compared whole, so two
different prefixes never share a block, whatever their hashes. A prompt's cached prefix is its longest chain of
blocks from the first one.

- The scheduler asks `lookup` how much of a new prompt is cached; the blocks it returns are held (reference
  counted) until the runner has copied them into the request's row, then `release`d.
- For every prefill chunk the scheduler `reserve`s blocks for the chunk's full blocks the cache lacks; the runner
  fills them from the row after its forward, and `commit` makes them visible to lookups (`discard` drops them if
  the step failed). A block being written is never returned by a lookup.
- Blocks nobody holds stay cached until their storage is needed: then the least recently used leaf goes (a
  block whose longer prefixes are cached stays as long as they do: evicting it would strand them).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

BlockKey = tuple[int, tuple[int, ...]]  # (the parent block's id, or -1 for a first block; the block's tokens)


@dataclass(eq=False)
class Block:
    id: int  # storage index: which of the runner's blocks holds this block's KV
    key: BlockKey
    parent: Block | None
    refs: int = 0  # holders: lookups not yet copied, reservations not yet committed
    children: int = 0  # cached blocks whose parent this is
    committed: bool = False  # its KV has been written: lookups may return it
    last_used: int = 0  # a tick of the cache's clock, for LRU eviction


@dataclass
class Reservation:
    """Blocks one prefill chunk writes: `writes` (block id, first position) are the new ones to fill from the row;
    `held` is every block of the chunk's chain, held until the chunk is committed or discarded."""

    writes: list[tuple[int, int]] = field(default_factory=list)
    held: list[Block] = field(default_factory=list)


@dataclass
class PrefixCacheStats:
    hit_tokens: int = 0  # prompt tokens served from the cache
    miss_tokens: int = 0  # prompt tokens prefilled
    evictions: int = 0  # blocks evicted to make room
    blocks: int = 0  # blocks holding a cached prefix now (a snapshot's; the live count is PrefixCache.blocks)


def blocks_in_budget(budget_mib: int, block_bytes: int) -> int:
    """How many blocks of block_bytes the prefix_cache_mib setting holds: 0 when it is 0 (the cache is off)."""
    if budget_mib < 0:
        raise ValueError(f"prefix_cache_mib must be 0 (off) or a positive number of MiB, got {budget_mib}")
    blocks = budget_mib * 2**20 // block_bytes
    if budget_mib and blocks < 1:
        raise ValueError(
            f"prefix_cache_mib={budget_mib} holds no block: one takes {block_bytes / 2**20:.1f} MiB for this model; "
            "raise it, or set 0 to turn the prefix cache off"
        )
    return blocks


class PrefixCache:
    def __init__(self, capacity: int, block_size: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prefix cache needs room for at least one block, got {capacity}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.capacity, self.block_size = capacity, block_size
        self.stats = PrefixCacheStats()
        self._blocks: dict[BlockKey, Block] = {}
        self._free_ids = list(range(capacity - 1, -1, -1))  # a stack: low ids first
        self._evictable: list[tuple[int, int, Block]] = []  # heap of (last_used, tiebreak, block), stale entries kept
        self._committed = 0  # blocks whose KV is written
        self._clock = itertools.count(1)
        self._tiebreak = itertools.count()

    @property
    def blocks(self) -> int:
        """Blocks that hold a cached prefix (committed)."""
        return self._committed

    def snapshot(self) -> PrefixCacheStats:
        return replace(self.stats, blocks=self.blocks)

    # ---- reading ----

    def cached_length(self, token_ids: Sequence[int]) -> int:
        """Tokens of token_ids `lookup` would find cached now."""
        return len(self._chain(token_ids)) * self.block_size

    def lookup(self, token_ids: Sequence[int]) -> list[Block]:
        """The longest cached chain of blocks `token_ids` starts with, held: at least one token is left over (a
        prompt's last token must be computed for its logits). Counts the prompt's hit and miss tokens."""
        chain = self._chain(token_ids)
        self._hold(chain)
        cached = len(chain) * self.block_size
        self.stats.hit_tokens += cached
        self.stats.miss_tokens += len(token_ids) - cached
        return chain

    def release(self, blocks: Sequence[Block]) -> None:
        """Give back blocks held by `lookup` (once copied into the row)."""
        now = next(self._clock)
        for block in blocks:
            block.refs -= 1
            block.last_used = now
            self._maybe_evictable(block)

    # ---- writing ----

    def reserve(self, token_ids: Sequence[int], end: int) -> Reservation:
        """Blocks for every full block of token_ids[:end] the cache lacks, new ones allocated (evicting if need
        be) and not visible to lookups until `commit`. Stops early when no storage can be freed, or where a block
        is being written by another reservation (that one will cache it)."""
        reservation = Reservation()
        parent: Block | None = None
        for index in range(end // self.block_size):
            key = self._key(parent, token_ids, index)
            block = self._blocks.get(key)
            if block is None:
                block = self._new_block(key, parent)
                if block is None:
                    break
                reservation.writes.append((block.id, index * self.block_size))
            elif not block.committed:
                break
            self._hold([block])
            reservation.held.append(block)
            parent = block
        return reservation

    def commit(self, reservation: Reservation) -> None:
        """The reservation's new blocks now hold their KV: visible to lookups, and released."""
        written = {block_id for block_id, _ in reservation.writes}
        for block in reservation.held:
            if block.id in written:
                block.committed = True
                self._committed += 1
        self.release(reservation.held)

    def discard(self, reservation: Reservation) -> None:
        """The step that was to fill the reservation failed: its new blocks go, the rest are released."""
        written = {block_id for block_id, _ in reservation.writes}
        for block in reversed(reservation.held):  # children before their parents
            block.refs -= 1
            if block.id in written:
                self._remove(block)
            else:
                self._maybe_evictable(block)

    def clear(self) -> int:
        """Evict every block nobody holds (memory pressure, or the runner's blocks were lost); returns how many."""
        removed = 0
        while self._evict_one():
            removed += 1
        return removed

    # ---- internals ----

    def _chain(self, token_ids: Sequence[int]) -> list[Block]:
        chain: list[Block] = []
        parent: Block | None = None
        for index in range((len(token_ids) - 1) // self.block_size):
            block = self._blocks.get(self._key(parent, token_ids, index))
            if block is None or not block.committed:
                break
            chain.append(block)
            parent = block
        return chain

    def _key(self, parent: Block | None, token_ids: Sequence[int], index: int) -> BlockKey:
        start = index * self.block_size
        return (-1 if parent is None else parent.id, tuple(token_ids[start : start + self.block_size]))

    def _hold(self, blocks: Sequence[Block]) -> None:
        for block in blocks:
            block.refs += 1

    def _new_block(self, key: BlockKey, parent: Block | None) -> Block | None:
        if not self._free_ids and not self._evict_one():
            return None
        block = Block(self._free_ids.pop(), key, parent, last_used=next(self._clock))
        self._blocks[key] = block
        if parent is not None:
            parent.children += 1
        return block

    def _maybe_evictable(self, block: Block) -> None:
        if block.refs == 0 and block.children == 0:
            heapq.heappush(self._evictable, (block.last_used, next(self._tiebreak), block))

    def _evict_one(self) -> bool:
        """Evict the least recently used block nobody holds and no cached block extends (held blocks, the chain
        a reservation is building included, are skipped: their entries are stale and come back on release)."""
        while self._evictable:
            last_used, _, block = heapq.heappop(self._evictable)
            if block.refs or block.children or last_used != block.last_used or self._blocks.get(block.key) is not block:
                continue  # a stale entry: held or extended since, or evicted already
            self._remove(block)
            self.stats.evictions += 1
            return True
        return False

    def _remove(self, block: Block) -> None:
        del self._blocks[block.key]
        self._committed -= block.committed
        self._free_ids.append(block.id)
        parent = block.parent
        if parent is not None:
            parent.children -= 1
            self._maybe_evictable(parent)
