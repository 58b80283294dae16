"""The detokenizer deployment: a stage on the queue, not a call.

Nobody calls it per request. Its replicas take the requests the enqueue script
assigns to the ``detokenizers`` consumer group, follow their token streams with one
blocking multi-stream read per turn (``DetokenizerStage``), and write text deltas to
each request's text stream, which the ingress reads. A replica that dies loses
nothing: its assignments stay pending, and after the lease a live replica takes
them over and rebuilds their state from the token streams. On a graceful stop a
replica hands its requests back for immediate takeover.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from services.detokenizer.decoders import ServedDecoders
from services.detokenizer.stage import DetokenizerStage
from services.errors import QueueUnavailableError
from services.queue import QueueConfig
from services.queue.detokenizer_queue import DetokenizerQueue
from services.queue.keys import consumer_name
from services.queue.outage import Backoff
from services.queue.served_variants import ServedVariantsSource
from services.serve_logs import route_to_serve_logs
from services.tokenizer.decoding import TextDecoder

logger = logging.getLogger(__name__)

# A loop turn blocks at most about a second; one that has not come back for this long is stuck.
STALL_AFTER_S = 30.0


class DetokenizerService:
    def __init__(
        self,
        model_paths: Mapping[str, str],
        redis_url: str,
        queue_config: QueueConfig,
        served_variants: ServedVariantsSource | None = None,
    ) -> None:
        route_to_serve_logs()  # our records in this replica's Serve log
        own = {name: TextDecoder.from_checkpoint(path) for name, path in model_paths.items()}
        decoders = ServedDecoders(own, served_variants.sync_view() if served_variants else None)
        self._queue_config = queue_config
        self._queue = DetokenizerQueue(redis_url, queue_config)
        self._queue.ensure_group()
        consumer = consumer_name()
        self._stage = DetokenizerStage(decoders, self._queue, consumer, queue_config.lease_s)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._last_turn = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="detokenizer-loop", daemon=True)
        self._thread.start()

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"detokenizer loop died: {self._error!r}")
        stalled = time.monotonic() - self._last_turn
        if stalled > STALL_AFTER_S:
            raise RuntimeError(f"detokenizer loop made no progress for {stalled:.1f}s")

    def owned_requests(self) -> tuple[int, tuple[str, ...]]:
        """(pid, ids of the requests this replica renders): for tests that kill the owner."""
        return os.getpid(), self._stage.owned_request_ids

    def stop(self) -> None:
        """Stop the loop and hand every owned request to another replica. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            logger.error("detokenizer loop did not stop; its requests wait for the lease to expire")
            return
        try:
            handed = self._stage.hand_back()
        except QueueUnavailableError:
            logger.warning("could not hand requests back; they wait for the lease to expire")
        else:
            logger.info("detokenizer replica stopped", extra={"handed_back": handed})
        self._queue.close()

    def __del__(self) -> None:
        """Ray Serve calls this on a graceful stop (rolling update, scale-down)."""
        if hasattr(self, "_thread"):
            self.stop()

    def _run(self) -> None:
        outage = Backoff()
        try:
            while not self._stop.is_set():
                self._last_turn = time.monotonic()  # waiting for Redis counts as progress
                try:
                    self._stage.turn()
                    pause_s = self._queue_config.busy_pause_s(len(self._stage.owned_request_ids))
                    if pause_s:
                        self._stop.wait(pause_s)  # let tokens gather: fewer, fuller reads and writes
                except QueueUnavailableError:
                    if not outage.waiting:
                        logger.warning("queue unavailable; detokenizer waits for Redis")
                    self._stop.wait(outage.next_delay())
                    continue
                if outage.waiting:
                    logger.info("queue back", extra={"outage_s": round(outage.elapsed_s, 3)})
                    outage.reset()
        except BaseException as exc:  # the health check reports it; Serve replaces the replica
            self._error = exc
            logger.exception("detokenizer loop died")
