"""What an engine replica records: queue time per claim, and a sample of its state about once
a second (running, waiting, KV usage, the model's queue depth, preemptions and the tokens it
generated since the last sample). The loop adds a token count per step to a plain int; Ray
exports every few seconds anyway, so sampling more often would buy nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.metrics import catalog
from services.metrics.ray_metrics import counter, gauge, histogram

SAMPLE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class EngineSample:
    """The replica's state at one moment; counters are totals since the replica started."""

    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    queue_depth: int
    preemptions: int


class EngineMetrics:
    """One engine replica's metrics (labels: its model)."""

    def __init__(self, model: str) -> None:
        self._tags = {"model": model}
        self._queue_time = histogram(catalog.REQUEST_QUEUE_TIME)
        self._running = gauge(catalog.NUM_REQUESTS_RUNNING)
        self._waiting = gauge(catalog.NUM_REQUESTS_WAITING)
        self._kv_usage = gauge(catalog.KV_CACHE_USAGE)
        self._queue_depth = gauge(catalog.QUEUE_DEPTH)
        self._preemptions = counter(catalog.NUM_PREEMPTIONS)
        self._generation_tokens = counter(catalog.GENERATION_TOKENS)
        self._unreported_tokens = 0
        self._reported_preemptions = 0
        self._next_sample = 0.0

    def claimed(self, arrival_time: float) -> None:
        """A request claimed for the first time; ``arrival_time`` is the ingress's wall clock at
        acceptance (0: an entry from before the field was set, not timed). Across nodes this
        is as good as their clocks agree; a negative difference is taken as 0."""
        if arrival_time > 0:
            self._queue_time.observe(max(0.0, time.time() - arrival_time), self._tags)

    def generated(self, num_tokens: int) -> None:
        self._unreported_tokens += num_tokens

    def sample_due(self, now: float) -> bool:
        """Whether a sample is due at ``now`` (``time.monotonic()``); then the next is a while off."""
        if now < self._next_sample:
            return False
        self._next_sample = now + SAMPLE_INTERVAL_S
        return True

    def record(self, sample: EngineSample) -> None:
        self._running.set(sample.running, self._tags)
        self._waiting.set(sample.waiting, self._tags)
        self._kv_usage.set(sample.used_blocks / max(1, sample.total_blocks), self._tags)
        self._queue_depth.set(sample.queue_depth, self._tags)
        self.flush_counters(sample.preemptions)

    def flush_counters(self, preemptions: int) -> None:
        """Report the tokens generated and the preemptions since the last report."""
        if self._unreported_tokens:
            self._generation_tokens.inc(self._unreported_tokens, self._tags)
            self._unreported_tokens = 0
        if preemptions > self._reported_preemptions:
            self._preemptions.inc(preemptions - self._reported_preemptions, self._tags)
            self._reported_preemptions = preemptions
