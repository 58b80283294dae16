"""One request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.messages import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids, KV blocks and progress of one request.

    ``token_ids`` holds the prompt followed by the output. ``num_computed_tokens``
    counts the tokens whose keys and values are in the cache; the engine feeds the
    model ``token_ids[num_computed_tokens:]``, a chunk at a time while prefilling
    and one token per step while decoding.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    priority: int
    arrival_order: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_emitted_tokens: int = 0  # output tokens already handed to the caller
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed_tokens == 1 and self.num_output_tokens > 0

    @property
    def scheduling_key(self) -> tuple[int, int]:
        """Lower first: priority value, then arrival (FCFS within a priority)."""
        return (self.priority, self.arrival_order)

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, the tokens stay and are prefilled again."""
        self.num_computed_tokens = 0
        self.block_table.clear()
        self.block_hashes.clear()
        self.status = SequenceStatus.WAITING
