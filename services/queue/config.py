"""Settings of the request queue: admission bound, lease, retry and retention."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class QueueConfig(BaseModel):
    """How the Redis request queue admits, leases and retains work.

    Sizes are per model; durations are seconds and become milliseconds on the wire.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_prefix: str = Field(
        default="tl",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="First segment of every Redis key the queue owns, so that several deployments "
        "can share one Redis without seeing each other's work.",
    )
    max_queue_depth: int = Field(
        default=1024,
        ge=1,
        description="Most accepted-but-unfinished requests one model may hold (queued plus running). "
        "Enqueue beyond it is refused with a retry hint; this bounds Redis memory under overload.",
    )
    lease_s: float = Field(
        default=10.0,
        gt=0.0,
        description="How long an engine may hold a request without renewing it. After that another "
        "engine may reclaim it and resume from the tokens already written.",
    )
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="How many engines may be handed the same request. A request delivered more often "
        "than this is presumed to crash engines and goes to the dead-letter stream.",
    )
    output_ttl_s: float = Field(
        default=600.0,
        gt=0.0,
        description="How long a request's output stream lives after its final entry, so that slow or "
        "reconnecting readers can still catch up before Redis frees it.",
    )
    idempotency_ttl_s: float = Field(
        default=86_400.0,
        gt=0.0,
        description="How long a request id is remembered after enqueue: a retry of the same id within "
        "this window is reported as a duplicate instead of being run twice.",
    )
    retry_after_s: float = Field(
        default=1.0,
        gt=0.0,
        description="Back-off that a refused client is told to wait before retrying (RESOURCE_EXHAUSTED).",
    )
    reader_outage_s: float = Field(
        default=30.0,
        gt=0.0,
        description="How long a stream reader waits for an unreachable Redis before it ends the "
        "client's stream with UNAVAILABLE; the client then continues with Resume. Engines wait for "
        "Redis as long as it takes, holding their unwritten output.",
    )
    busy_read_interval_ms: float = Field(
        default=8.0,
        ge=0.0,
        description="Under load the return path trades a little latency for CPU: while a reader "
        "(a detokenizer replica, an ingress replica's text reader) follows at least "
        "busy_read_streams streams, it waits this long after each read, so that the next one brings "
        "several tokens per stream and every message sent carries them together. With fewer streams it "
        "reads again at once, so a lone stream gets each token as soon as it is written. 0 = never wait.",
    )
    busy_read_streams: int = Field(
        default=8,
        ge=1,
        description="How many followed streams make a reader busy (see busy_read_interval_ms).",
    )
    tokenize_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="How long an ingress replica waits for a tokenizer replica to answer a call "
        "before it refuses the request with UNAVAILABLE (no tokenizer replica running, or all stuck). "
        "Nothing was accepted: the client may retry.",
    )
    tokenize_reclaim_s: float = Field(
        default=2.0,
        gt=0.0,
        description="A tokenizer call that a replica took and left unanswered this long is taken "
        "over by another replica (its taker died). A replica answers what it takes at once, so "
        "only a dead or stuck one leaves a call waiting this long.",
    )

    dead_letter_max_entries: int = Field(
        default=10_000,
        ge=1,
        description="Approximate cap on each model's dead-letter stream; the oldest entries are trimmed.",
    )

    def busy_pause_s(self, streams: int) -> float:
        """How long a reader following ``streams`` streams waits before its next read."""
        return self.busy_read_interval_ms / 1000 if streams >= self.busy_read_streams else 0.0

    @property
    def lease_ms(self) -> int:
        return _milliseconds(self.lease_s)

    @property
    def output_ttl_ms(self) -> int:
        return _milliseconds(self.output_ttl_s)

    @property
    def idempotency_ttl_ms(self) -> int:
        return _milliseconds(self.idempotency_ttl_s)


def _milliseconds(seconds: float) -> int:
    # Redis rejects a zero expiry or idle time; sub-millisecond settings round up to 1 ms.
    return max(1, round(seconds * 1000))
