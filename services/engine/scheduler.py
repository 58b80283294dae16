"""Continuous (iteration-level) batching with chunked prefill and recompute preemption."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` uncomputed tokens of ``seq`` to run this step."""

    seq: Sequence
    num_tokens: int

    @property
    def completes_prefill(self) -> bool:
        """True when this chunk reaches the end of the sequence, so the step samples a token for it."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.num_tokens for chunk in self.prefills)


class Scheduler:
    """Decides, each step, which tokens run.

    Order of service: running sequences first (oldest admission first), each
    decoding one token or continuing its prefill; then waiting sequences by
    (priority, arrival) until the token budget, the batch slots or the free
    blocks run out. A waiting sequence that does not fit blocks those behind it,
    so a large request is not starved by small ones. When a running sequence
    needs a block and none is free, the running sequence that would be served
    last is preempted: its blocks are freed and it is recomputed later.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by scheduling_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.scheduling_key)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks (abort or finish)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = 1 if seq.is_decoding else min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_tokens, out):
                continue
            budget -= num_tokens
            if seq.is_decoding:
                out.decodes.append(seq)
            else:
                out.prefills.append(ScheduledChunk(seq, num_tokens))
        if out.preempted:
            return out  # memory is short: admit nobody new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = self.block_manager.match_prefix(seq)
                seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate(seq, num_tokens):
                self.block_manager.free(seq)  # give back prefix-cache hits; retried next step
                seq.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= num_tokens
            out.prefills.append(ScheduledChunk(seq, num_tokens))
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for ``seq``, preempting the last-served running sequences if needed.
        Returns False when ``seq`` itself had to be preempted."""
        while not self.block_manager.allocate(seq, num_tokens):
            victim = max(
                (s for s in self.running if s.status is SequenceStatus.RUNNING),
                key=lambda s: s.scheduling_key,
            )
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.add(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
        # A victim already scheduled this step must not run with freed blocks.
        if seq in out.decodes:
            out.decodes.remove(seq)
        for chunk in out.prefills:
            if chunk.seq is seq:
                out.prefills.remove(chunk)
                break
