"""How a claimed request enters an engine replica's engine, and how much room the replica
offers the queue for new ones.

Pulling only what fits: the replica offers its free batch slots and the KV blocks not yet
promised to prompts it holds; the queue's claim looks at each request before it takes it,
most urgent priority first, so work this replica cannot start stays free for another. A
reclaimed request, whose produced tokens count too, that does not fit is handed straight
back; one whose prompt exceeds the whole KV cache (replicas of a model share one engine
config) ends with an ERROR naming its length instead of bouncing between replicas.
"""

from __future__ import annotations

import logging

from services.engine.backend import EngineBackend
from services.engine.holdings import Holdings
from services.engine.outputs import EngineCapacity
from services.errors import InvalidParameterError
from services.messages import FinishReason
from services.metrics.engine import EngineMetrics
from services.queue import ClaimedRequest, EngineQueue, KvBudget

logger = logging.getLogger(__name__)


class Admission:
    def __init__(
        self,
        engine: EngineBackend,
        queue: EngineQueue,
        model_name: str,
        consumer: str,
        holdings: Holdings,
        metrics: EngineMetrics,
    ) -> None:
        self._engine = engine
        self._queue = queue
        self._model = model_name
        self._consumer = consumer
        self._holdings = holdings
        self._metrics = metrics

    def room(self, draining: bool) -> tuple[int, KvBudget]:
        """New requests the replica can take now and their KV budget. No slots while draining
        or while anything held waits for KV blocks: pulling more would hoard work."""
        capacity = self._engine.capacity()
        kv = self._kv_budget(capacity)
        if draining or capacity.waiting or kv.free_blocks <= 0:
            return 0, kv
        return capacity.free_slots, kv

    def _kv_budget(self, capacity: EngineCapacity) -> KvBudget:
        """The KV blocks new prompts may fill: free blocks not already promised to prompts held."""
        free = capacity.free_blocks - self._engine.reserved_blocks()
        return KvBudget(free, capacity.block_size, capacity.total_blocks)

    def admit_all(self, claimed: list[ClaimedRequest]) -> None:
        for item in claimed:
            self._admit(item)

    def _admit(self, item: ClaimedRequest) -> None:
        request, holdings = item.request, self._holdings
        request_id, num_prompt_tokens = request.request_id, len(request.prompt_token_ids)
        if not item.reclaimed:  # queue time ends at the first claim; a reclaim is not queueing
            self._metrics.claimed(request.arrival_time)
        if item.cancelled:
            holdings.hold(request_id, item.entry_id, num_prompt_tokens)
            holdings.end(request_id, FinishReason.ABORT)
            return
        produced: list[int] = []
        if item.reclaimed:  # someone ran it before: resume after what reached the stream
            produced, finished = self._queue.read_output_tokens(request_id)
            if finished:
                holdings.finished_elsewhere(request_id, item.entry_id)
                return
        kv = self._kv_budget(self._engine.capacity())  # reflects the requests admitted just before this one
        need = kv.blocks_for(num_prompt_tokens + len(produced) + 1)
        if kv.free_blocks < need <= kv.total_blocks:  # fits later or elsewhere: do not hold it
            self._queue.hand_back(self._model, self._consumer, [item.entry_id])
            return
        holdings.hold(request_id, item.entry_id, num_prompt_tokens, next_index=len(produced))
        if need > kv.total_blocks:  # fits no replica of this model: fail it rather than bounce it
            blocks = f"{need} KV blocks; a replica has {kv.total_blocks}"
            error = f"prompt of {num_prompt_tokens} tokens (+{len(produced)} generated) needs {blocks}"
            holdings.end(request_id, FinishReason.ERROR, error=error)
            return
        try:
            self._engine.add_request(
                request_id,
                request.prompt_token_ids,
                request.params,
                priority=request.priority,
                output_prefix=produced,
            )
        except InvalidParameterError as exc:
            holdings.end(request_id, FinishReason.ERROR, error=str(exc))
            return
        logger.info(
            "request admitted",
            extra={"request_id": request_id, "resumed_tokens": len(produced), "deliveries": item.deliveries},
        )
