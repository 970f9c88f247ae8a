"""engine/prefix_cache.py without a model: which prefixes hit, what a lookup holds, what is evicted and when, and
the budget's errors."""

import pytest

from engine.prefix_cache import PrefixCache, blocks_in_budget

B = 4


def cache_with(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """Store every full block of tokens (as a prefill of them would) and return the blocks' ids."""
    reservation = cache.reserve(tokens, len(tokens))
    cache.commit(reservation)
    return [block_id for block_id, _ in reservation.writes]


def test_a_lookup_finds_the_longest_cached_chain_and_leaves_a_token_to_compute():
    cache = PrefixCache(capacity=8, block_size=B)
    stored = cache_with(cache, list(range(12)))
    assert len(stored) == 3
    assert [b.id for b in cache.lookup(list(range(12)))] == stored[:2]  # the 12th token must be computed
    assert [b.id for b in cache.lookup([*range(12), 99])] == stored
    assert [b.id for b in cache.lookup([*range(6), 50, 51, 52, 53])] == stored[:1]  # diverges in block 2
    assert cache.lookup([1, 0, 2, 3, 4]) == []


def test_the_same_tokens_after_a_different_prefix_are_another_block():
    cache = PrefixCache(capacity=8, block_size=B)
    cache_with(cache, [1, 2, 3, 4, 9, 9, 9, 9])
    assert cache.cached_length([5, 6, 7, 8, 9, 9, 9, 9, 0]) == 0
    cache_with(cache, [5, 6, 7, 8, 9, 9, 9, 9])
    assert cache.blocks == 4
    assert cache.cached_length([5, 6, 7, 8, 9, 9, 9, 9, 0]) == 8


def test_a_block_being_written_is_invisible_until_committed_and_gone_if_discarded():
    cache = PrefixCache(capacity=8, block_size=B)
    tokens = list(range(9))
    reservation = cache.reserve(tokens, 8)
    assert len(reservation.writes) == 2 and cache.cached_length(tokens) == 0
    assert cache.reserve(tokens, 8).writes == []  # another row with the same prompt leaves it to the first
    cache.discard(reservation)
    assert cache.blocks == 0 and cache.cached_length(tokens) == 0
    assert len(cache.reserve(tokens, 8).writes) == 2  # the storage came back


def test_the_least_recently_used_leaf_goes_first_and_held_blocks_never():
    cache = PrefixCache(capacity=4, block_size=B)
    old = [10, 11, 12, 13, 14, 15, 16, 17]
    new = [20, 21, 22, 23]
    cache_with(cache, old)
    cache_with(cache, new)
    cache.release(cache.lookup([*new, 0]))  # `new` used since `old`
    held = cache.lookup([*old, 0])  # `old` is being copied: held
    assert len(cache_with(cache, [30, 31, 32, 33])) == 1  # the one free block
    assert cache.cached_length([*new, 0]) == 4
    assert len(cache_with(cache, [40, 41, 42, 43])) == 1  # evicts `new`: `old` is held
    assert cache.cached_length([*new, 0]) == 0 and cache.cached_length([*old, 0]) == 8
    assert cache.stats.evictions == 1
    cache.release(held)  # `old` is now the most recently used
    assert len(cache_with(cache, [50, 51, 52, 53, 54, 55, 56, 57])) == 2  # evicts [30..] and [40..]
    assert cache.cached_length([*old, 0]) == 8
    # `old`'s first block has a cached child: that leaf goes first, then the first block, older than [50..]'s.
    assert len(cache_with(cache, [60, 61, 62, 63])) == 1
    assert cache.cached_length([*old, 0]) == 4
    assert len(cache_with(cache, [70, 71, 72, 73])) == 1
    assert cache.cached_length([*old, 0]) == 0 and cache.cached_length([50, 51, 52, 53, 54, 55, 56, 57, 0]) == 8


def test_when_every_block_is_held_nothing_more_is_stored():
    cache = PrefixCache(capacity=2, block_size=B)
    cache_with(cache, list(range(8)))
    held = cache.lookup(list(range(9)))
    assert cache.reserve(list(range(100, 108)), 8).writes == []
    cache.release(held)
    assert len(cache.reserve(list(range(100, 108)), 8).writes) == 2


def test_clear_evicts_everything_but_what_is_held():
    cache = PrefixCache(capacity=8, block_size=B)
    cache_with(cache, list(range(8)))
    cache_with(cache, list(range(50, 58)))
    held = cache.lookup([50, 51, 52, 53, 0])
    assert cache.clear() == 3
    assert cache.blocks == 1 and cache.cached_length([50, 51, 52, 53, 0]) == 4
    cache.release(held)


def test_hits_and_misses_count_prompt_tokens():
    cache = PrefixCache(capacity=8, block_size=B)
    cache.lookup(list(range(10)))
    cache_with(cache, list(range(10)))
    cache.lookup(list(range(10)))
    assert (cache.stats.hit_tokens, cache.stats.miss_tokens) == (8, 10 + 2)


def test_the_budget_in_mib_names_the_setting_when_it_holds_no_block():
    assert blocks_in_budget(0, 1000) == 0
    assert blocks_in_budget(1, 2**19) == 2
    with pytest.raises(ValueError, match="prefix_cache_mib=1 holds no block"):
        blocks_in_budget(1, 2**21)
    with pytest.raises(ValueError, match="prefix_cache_mib must be 0"):
        blocks_in_budget(-5, 1000)
