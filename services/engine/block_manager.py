"""Paged KV-cache bookkeeping: which block holds which tokens. Pure Python.

Blocks are fixed-size pages of the KV cache. A sequence owns a block table (its
blocks in order). With prefix caching, every *full* block is identified by a
chained hash of all tokens up to its end; a later sequence whose prompt starts
with the same tokens reuses those blocks (reference counted) instead of
computing them again. Freed blocks that carry a hash stay cached, in LRU order,
until their space is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from services.engine.sequence import Sequence


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None
    tokens: tuple[int, ...] = ()  # kept with the hash so a hash collision can never alias content


def chain_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self._by_hash: dict[int, int] = {}

    # ---- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so the sequence can hold ``num_new_tokens`` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    # ---- allocation -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks that hold a prefix of a fresh sequence; return the tokens matched.

        At least one token is always left to compute, because sampling needs the
        logits of the last token.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        parent: int | None = None
        for index in range(max_blocks):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            content_hash = chain_hash(parent, tokens)
            block_id = self._by_hash.get(content_hash)
            if block_id is None or self._blocks[block_id].tokens != tokens:
                break
            self._retain(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(content_hash)
            parent = content_hash
        matched = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = matched
        return matched

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Room for ``num_new_tokens`` more tokens; False, changing nothing, if they do not fit."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence. The tail is released first so that,
        among cached blocks, the shared prefixes are the last to be evicted."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} released more often than taken")
            if block.ref_count == 0:
                if block.content_hash is None:
                    self._free_uncached.append(block_id)
                else:
                    self._free_cached[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for index in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            content_hash = chain_hash(parent, tokens)
            seq.block_hashes.append(content_hash)
            parent = content_hash
            if content_hash in self._by_hash:
                continue  # another sequence published the same content first
            block = self._blocks[seq.block_table[index]]
            block.content_hash = content_hash
            block.tokens = tokens
            self._by_hash[content_hash] = block.block_id

    # ---- internals ------------------------------------------------------------------------
    def _retain(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(block_id)
        self._blocks[block_id].ref_count = 1
        return block_id

    def _evict(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.content_hash is not None:
            del self._by_hash[block.content_hash]
        block.content_hash = None
        block.tokens = ()
