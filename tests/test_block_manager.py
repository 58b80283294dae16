"""The block manager is pure Python: exact accounting, prefix caching, LRU eviction."""

from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence
from services.messages import SamplingParams


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(
        request_id=request_id,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        params=SamplingParams(),
        seed=0,
        priority=0,
        arrival_order=0,
    )


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    """Pretend the model ran over every uncomputed token."""
    if not manager.allocate(seq, seq.num_uncomputed_tokens):
        raise AssertionError("test setup: allocation failed")
    seq.num_computed_tokens = seq.num_tokens
    manager.register_full_blocks(seq)


def test_allocate_and_free_return_accounting_to_zero() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert manager.blocks_needed(seq, 10) == 3
    assert manager.allocate(seq, 10)
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 5
    manager.free(seq)
    assert manager.num_used_blocks == 0
    assert seq.block_table == []


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not manager.allocate(seq, 12)
    assert seq.block_table == []
    assert manager.num_free_blocks == 2


def test_growth_allocates_only_when_a_block_fills() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq([1, 2, 3])
    manager.allocate(seq, 3)
    seq.num_computed_tokens = 3
    assert manager.blocks_needed(seq, 1) == 0
    seq.num_computed_tokens = 4
    assert manager.blocks_needed(seq, 1) == 1


def test_prefix_hit_shares_full_blocks_and_leaves_one_token_to_compute() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(12)), "a")
    compute_all(manager, first)
    second = make_seq(list(range(12)), "b")
    matched = manager.match_prefix(second)
    # 12 tokens = 3 full blocks, but the last token must be computed: 2 blocks match.
    assert matched == 8
    assert second.block_table == first.block_table[:2]
    assert manager.num_used_blocks == 3
    manager.free(first)
    manager.free(second)
    assert manager.num_used_blocks == 0


def test_prefix_match_stops_at_first_different_block() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    compute_all(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    other = make_seq([1, 2, 3, 4, 0, 6, 7, 8, 9], "b")
    assert manager.match_prefix(other) == 4


def test_freed_cached_blocks_are_reused_until_evicted_in_lru_order() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3, 4, 5], "old")
    compute_all(manager, old)
    manager.free(old)
    assert manager.num_used_blocks == 0
    assert manager.num_cached_blocks == 2
    # A new sequence needs all 4 blocks: the single uncached block goes first, then
    # cached blocks are evicted, the tail of the old sequence before its head.
    hungry = make_seq([9] * 7, "hungry")
    assert manager.allocate(hungry, 7)
    assert manager.num_cached_blocks == 0
    manager.free(hungry)
    assert manager.num_used_blocks == 0


def test_cached_prefix_survives_partial_eviction() -> None:
    manager = BlockManager(num_blocks=5, block_size=2)
    old = make_seq([1, 2, 3, 4, 5], "old")
    compute_all(manager, old)
    manager.free(old)
    filler = make_seq([7, 7, 7], "filler")  # takes 2 blocks: 2 uncached ones remain first
    manager.allocate(filler, 3)
    filler2 = make_seq([8], "filler2")  # takes the last uncached block
    manager.allocate(filler2, 1)
    assert manager.num_cached_blocks == 2
    filler3 = make_seq([6], "filler3")  # evicts the LRU cached block: the old tail [3, 4]
    manager.allocate(filler3, 1)
    again = make_seq([1, 2, 3, 4, 5], "again")
    assert manager.match_prefix(again) == 2


def test_double_free_is_detected() -> None:
    manager = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq([1, 2])
    manager.allocate(seq, 2)
    table = list(seq.block_table)
    manager.free(seq)
    seq.block_table.extend(table)
    with pytest.raises(RuntimeError):
        manager.free(seq)
