"""The queue as one engine replica sees it: claims and leases on one side, the per-step write
on the other, over one synchronous Redis client.

Synchronous on purpose: an engine replica's batching loop is a plain thread, and each step
makes exactly one round trip for all of its output and cancellations. The two halves live
in their own modules (``engine_claims``, ``engine_output``); this class only joins them.
"""

from __future__ import annotations

from services.queue.engine_claims import ClaimedRequest, EngineClaims, KvBudget
from services.queue.engine_output import EngineOutput, StepReply

__all__ = ["ClaimedRequest", "EngineQueue", "KvBudget", "StepReply"]


class EngineQueue(EngineClaims, EngineOutput):
    """Everything an engine replica asks of the queue. Safe to share between threads: every
    call takes its own connection from redis-py's pool."""
