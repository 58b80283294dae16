"""An engine replica: the one place where the engine core meets the Redis queue.

A background thread runs the loop: renew leases, reclaim requests whose holder
died, pull only as much new work as fits, run one engine step, and send every
running request's new tokens through the step writer in one Redis pipeline (that also
acknowledges finished requests and brings back the cancellations), whose replies it
reads after the engine has computed the next step. An idle replica claims on the
loop, blocking until work arrives; a busy one claims within its step writes, so
its steps never wait for a claim's round trip. Ray Serve calls
``check_health``; it fails when the loop has not made progress for
``stall_after_s``, and Serve then replaces the replica. Its requests are left
pending in Redis and a live replica resumes them.

The loop runs at the replica's ``nice`` (services/engine/cpu_priority.py): on
cores shared with the data plane the engine's step goes first and text waits and gathers.

When Redis is away the loop keeps what the engine produced in an outbox and
retries; it never steps further ahead than one unwritten step (plus the one whose
write is in flight). What it holds and owes Redis is kept in ``holdings``; how a claimed
request enters the engine, and how much room the replica offers the queue, is ``admission``.
On a graceful stop the replica finishes what it holds for a while, then hands the rest back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from services.engine.admission import Admission
from services.engine.autoscaling import queue_load_stats
from services.engine.backend import make_engine
from services.engine.config import EngineConfig
from services.engine.cpu_priority import apply_thread_nice
from services.engine.holdings import Holdings
from services.errors import QueueUnavailableError
from services.messages import FinishReason
from services.metrics.engine import EngineMetrics, EngineSample
from services.queue import EngineQueue, KvBudget, QueueConfig
from services.queue.keys import consumer_name
from services.queue.outage import Backoff
from services.queue.step_writer import ClaimOffer, OutputWriter
from services.serve_logs import route_to_serve_logs

logger = logging.getLogger(__name__)

# How long an idle replica blocks on the queue's doorbell before it looks around again (lease
# renewals, reclaims, metrics, a stop). An enqueue rings the doorbell and ends the wait at once,
# so this bounds only how late an idle replica notices a stop; each turn costs two Redis round
# trips (the claim script, the blocking read), 8 a second at 250 ms against 40 at 50.
IDLE_WAIT_MS = 250


@dataclass(frozen=True)
class ReplicaStatus:
    pid: int
    consumer: str
    running: int
    waiting: int
    held_request_ids: tuple[str, ...]
    free_blocks: int
    steps: int
    seconds_since_progress: float
    loop_nice: int  # the step loop's nice value as the kernel holds it: whether ``nice`` took


class EngineReplica:
    def __init__(
        self,
        model_name: str,
        engine_config: EngineConfig,
        redis_url: str,
        queue_config: QueueConfig,
        num_threads: int = 1,
        stall_after_s: float = 30.0,
        drain_s: float = 10.0,
        nice: int = 0,
    ) -> None:
        route_to_serve_logs()  # our records in this replica's Serve log
        torch.set_num_threads(num_threads)
        self.model_name = model_name
        self.engine = make_engine(engine_config)
        self.queue = EngineQueue(redis_url, queue_config)
        self.queue.ensure_group(model_name)
        self.consumer = consumer_name()
        self._lease_s = queue_config.lease_s
        self._stall_after_s = stall_after_s
        self._drain_s = drain_s
        self._holdings = Holdings()
        self._nice = nice
        self._writer = OutputWriter(self.queue, model_name, self.consumer)
        self._metrics = EngineMetrics(model_name)
        self._admission = Admission(
            self.engine, self.queue, model_name, self.consumer, self._holdings, self._metrics
        )
        now = time.monotonic()
        self._next_renew = self._next_reclaim = now
        self._last_progress = time.monotonic()
        self._paused = threading.Event()  # test hook for the "stuck loop" fault; see pause_loop
        self._draining = threading.Event()  # set by stop(): finish what is held, take nothing new
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- control plane (called by Ray Serve) ----------------------------------------------
    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"engine loop died: {self._error!r}")
        stalled = time.monotonic() - self._last_progress
        if stalled > self._stall_after_s:
            raise RuntimeError(f"engine loop made no progress for {stalled:.1f}s")

    def status(self) -> ReplicaStatus:
        capacity = self.engine.capacity()
        return ReplicaStatus(
            pid=os.getpid(),
            consumer=self.consumer,
            running=capacity.running,
            waiting=capacity.waiting,
            held_request_ids=tuple(self._holdings.held),
            free_blocks=capacity.free_blocks,
            steps=self.engine.stats.steps,
            seconds_since_progress=time.monotonic() - self._last_progress,
            loop_nice=os.getpriority(os.PRIO_PROCESS, self._thread.native_id or 0),
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every metrics interval when the deployment autoscales: the queue
        load that ``services.engine.autoscaling.QueueLoadPolicy`` scales on."""
        return queue_load_stats(self.queue, self.model_name, held=len(self._holdings.held))

    def pause_loop(self) -> None:
        """Freeze the loop while the process stays alive: how tests produce a stuck engine."""
        self._paused.set()

    def stop(self, drain_s: float) -> None:
        """Take no new work, let the held requests run for up to ``drain_s``, then stop the loop
        and hand what is left back to the queue, where another replica resumes it at once.
        Idempotent."""
        if self._stop.is_set():
            return
        self._draining.set()
        deadline = time.monotonic() + drain_s
        while (
            self._thread.is_alive()
            and (self._holdings.held or self._holdings.owes_redis or self._writer.busy)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():  # wedged in a call: its leases run out and others reclaim
            logger.error(
                "engine loop did not stop; leaving its requests to lease expiry", extra=self._log_context()
            )
            return
        try:
            self._write_now()
            handed = self.queue.hand_back(
                self.model_name, self.consumer, [h.entry_id for h in self._holdings.held.values()]
            )
        except QueueUnavailableError:
            logger.warning(
                "could not hand requests back; they wait for lease expiry", extra=self._log_context()
            )
        else:
            logger.info("engine replica stopped", extra={**self._log_context(), "handed_back": handed})
        self._metrics.flush_counters(self.engine.stats.preemptions)
        self._writer.close()
        self.queue.close()

    def __del__(self) -> None:
        """Ray Serve calls this on a graceful stop (rolling update, scale-down)."""
        if hasattr(self, "_thread"):  # the constructor may have failed before the loop existed
            self.stop(self._drain_s)

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        apply_thread_nice(self._nice)
        outage = Backoff()
        try:
            while not self._stop.is_set():
                if self._paused.is_set():
                    time.sleep(0.1)
                    continue
                # Waiting for Redis counts as progress: replacing the replica would not bring Redis back.
                self._last_progress = time.monotonic()
                try:
                    self._iterate()
                except QueueUnavailableError:
                    if not outage.waiting:
                        logger.warning("queue unavailable; engine waits for Redis", extra=self._log_context())
                    self._stop.wait(outage.next_delay())
                    continue
                if outage.waiting:
                    logger.info(
                        "queue back", extra={**self._log_context(), "outage_s": round(outage.elapsed_s, 3)}
                    )
                    outage.reset()
        except BaseException as exc:  # the health check reports it; Serve replaces the replica
            self._error = exc
            logger.exception("engine loop died", extra=self._log_context())

    def _iterate(self) -> None:
        """One turn of the loop. Any Redis call may raise QueueUnavailableError; whatever the
        engine produced stays in the outbox and is written before the engine steps again."""
        if self._holdings.owes_redis:
            self._write_now()
        now = time.monotonic()
        if now >= self._next_renew:
            self._renew_leases()
            self._next_renew = now + self._lease_s / 3
        if now >= self._next_reclaim:
            self._admission.admit_all(
                self.queue.reclaim_expired(self.model_name, self.consumer, self._room()[0])
            )
            self._next_reclaim = now + self._lease_s / 2
        if not self.engine.has_unfinished():  # busy, the step writes claim (see _submit)
            room, kv = self._room()
            if room:
                wait_ms = 0 if self._writer.busy else IDLE_WAIT_MS
                self._admission.admit_all(self.queue.claim(self.model_name, self.consumer, room, wait_ms, kv))
        if self.engine.has_unfinished():
            self._step()
        else:
            self._settle()  # the last step's write; nothing to overlap it with
        if self._metrics.sample_due(now):
            self._record_metrics()

    def _record_metrics(self) -> None:
        capacity = self.engine.capacity()
        sample = EngineSample(
            running=capacity.running,
            waiting=capacity.waiting,
            used_blocks=capacity.total_blocks - capacity.free_blocks,
            total_blocks=capacity.total_blocks,
            queue_depth=self.queue.unfinished(self.model_name),
            preemptions=self.engine.stats.preemptions,
        )
        self._metrics.record(sample)

    def _room(self) -> tuple[int, KvBudget]:
        return self._admission.room(draining=self._draining.is_set())

    def _step(self) -> None:
        """Compute step N+1 while step N's output is being written, then hand N+1 over."""
        self._metrics.generated(self._holdings.record(self.engine.step()))
        self._settle()
        self._submit(poll_cancels=True)

    def _submit(self, poll_cancels: bool) -> None:
        write = self._holdings.take_write(poll_cancels)
        if write is not None:
            offer = self._claim_offer() if poll_cancels else None  # a step's write claims too
            self._writer.submit(write.chunks, write.acknowledged, write.running, offer)

    def _claim_offer(self) -> ClaimOffer | None:
        room, kv = self._room()
        return ClaimOffer(room, kv) if room else None

    def _settle(self) -> None:
        """Apply the result of the write in flight. Raises QueueUnavailableError with nothing
        lost: its chunks go back to the front of the outbox to be written again."""
        result = self._writer.settle()
        if result is None:
            return
        if result.error is not None:
            self._holdings.not_written(result.chunks, result.acknowledged)
            raise result.error
        self._holdings.written(result.acknowledged)
        for request_id in result.cancelled:
            if request_id in self._holdings.held:
                self.engine.abort(request_id)
                self._holdings.end(request_id, FinishReason.ABORT)
        self._admission.admit_all(result.claimed)

    def _write_now(self) -> None:
        """Write everything pending and wait for it (after an outage, and on stop)."""
        self._settle()
        self._submit(poll_cancels=False)
        self._settle()

    def _log_context(self) -> dict[str, str]:
        return {"model": self.model_name, "consumer": self.consumer}

    def _renew_leases(self) -> None:
        held = self._holdings.held
        if not held:
            return
        entry_to_request = {h.entry_id: rid for rid, h in held.items()}
        lost = self.queue.renew(self.model_name, self.consumer, list(entry_to_request))
        for entry_id in lost:
            request_id = entry_to_request[entry_id]
            logger.warning("lease lost; dropping request", extra={"request_id": request_id})
            self.engine.abort(request_id)
            self._holdings.drop(request_id)
