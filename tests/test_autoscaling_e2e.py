"""Engine autoscaling on the real stack: engines scale on the work waiting in Redis.

Its own stack (Serve runs one instance per Ray cluster): one to two engine replicas of the demo
model with two batch slots each, a target of five unfinished requests per replica and short
delays, so that a burst, the idle time after it and a scale-down under load each take seconds.
Serve's own view of the replicas (``serve.status()``) is sampled in the background and dates
every change. Streams are greedy and compared with a fault-free run of the same prompts.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from ray import serve

from services.client import TokenlineClient
from services.config import EngineAutoscaling
from services.queue.keys import ENGINE_GROUP, QueueKeys
from tests.serving_stack import MODEL_NAME, Stack, stack_config, start_stack
from tests.stack_probes import request, token_ids, wait_until

OWN_STACK = True
ENGINE = f"engine-{MODEL_NAME}"
PROMPTS = ["12+35=", "40+7=", "Count: 3 4 5", "25+61="]
SLOTS = 2  # batch slots per replica
SCALING = EngineAutoscaling(
    enabled=True,
    min_replicas=1,
    max_replicas=2,
    target_per_replica=5,
    upscale_delay_s=2.0,
    downscale_delay_s=4.0,
    metrics_interval_s=0.5,
)
# A report reaches the controller within two metric intervals (one to sample, one to push);
# the rest is for Serve's controller loop and this test's sampling on a machine shared with
# other jobs.
REPORT_SLACK_S = 2 * SCALING.metrics_interval_s + 2.0
TOKENS = 400  # per request: a second or two on one replica, so a stopping replica holds some
BURST = 48  # one-shot requests: more than target_per_replica for seconds, even on two replicas
# (with 24, once the engine's loop got faster, one full-suite run saw no second replica: the
# burst can drain below the target before the upscale delay and the reports have passed)
STEADY = 12  # clients streaming back to back: over two replicas' worth of work, until told to stop
# Clients that go on through a scale-down: one replica's worth (the target), one more than both
# replicas' slots, so a request always waits and a slot freed on the replica Serve stops is
# refilled within a step. With exactly four (both replicas' slots) the stopped replica now and
# then held nothing: its two requests had just ended and the clients' next ones were still on
# their way through the ingress.
HANDOFF_CLIENTS = int(SCALING.target_per_replica)
STREAM_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def stack(demo_model_dir: Path) -> Iterator[Stack]:
    """This module's stack, in place of the shared one: engines that autoscale."""
    config = stack_config(str(demo_model_dir), engine_replicas=1)
    (model,) = config.models
    engine = model.engine.model_copy(update={"max_num_seqs": SLOTS})
    # No drain: a replica that is scaled down hands back at once everything it holds.
    scaled = model.model_copy(update={"engine": engine, "engine_drain_s": 0.0, "engine_autoscaling": SCALING})
    yield from start_stack(config.model_copy(update={"models": (scaled,)}))


@pytest.fixture(scope="module")
def expected(stack: Stack) -> dict[str, list[int]]:
    """Fault-free greedy tokens of each prompt, one request at a time (load 1: no scaling)."""
    with TokenlineClient(stack.target, stack.api_key) as client:
        return {p: token_ids(client.stream(request(p, max_tokens=TOKENS), STREAM_TIMEOUT_S)) for p in PROMPTS}


@dataclass(frozen=True)
class Finished:
    request_id: str
    prompt: str
    tokens: list[int]
    at: float  # time.monotonic() when the stream ended


class Clients:
    """``count`` clients, each streaming greedy requests back to back (at least one) until it
    is stopped; every finished stream is kept."""

    def __init__(self, stack: Stack, tag: str, count: int) -> None:
        self.finished: list[Finished] = []
        self._stack, self._tag = stack, tag
        self._stops = [threading.Event() for _ in range(count)]
        self._pool = ThreadPoolExecutor(max_workers=count)
        self._workers = [self._pool.submit(self._run, worker) for worker in range(count)]

    def stop(self, count: int | None = None) -> None:
        """Stop ``count`` clients (all by default) after the request each has in flight."""
        for event in self._stops[len(self._stops) - (count or len(self._stops)) :]:
            event.set()

    def join(self) -> list[Finished]:
        """Stop every client and wait for its last stream; a failed stream raises here."""
        self.stop()
        try:
            for worker in self._workers:
                worker.result(timeout=STREAM_TIMEOUT_S)
        finally:
            self._pool.shutdown(wait=False)
        return self.finished

    def _run(self, worker: int) -> None:
        with TokenlineClient(self._stack.target, self._stack.api_key) as client:
            for i in itertools.count():
                prompt = PROMPTS[(worker + i) % len(PROMPTS)]
                request_id = f"{self._tag}-{worker}-{i}"
                stream = client.stream(request(prompt, request_id, TOKENS), STREAM_TIMEOUT_S)
                self.finished.append(Finished(request_id, prompt, token_ids(stream), time.monotonic()))
                if self._stops[worker].is_set():
                    return


class ReplicaTimeline:
    """Serve's replica counts of the engine deployment, sampled every 0.1 s from ``start``."""

    def __init__(self, stack: Stack) -> None:
        self._app = stack.config.app_name
        self.started = time.monotonic()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def first(self, condition: Callable[[dict[str, int]], bool]) -> float:
        """Seconds from ``started`` to the first sample that meets ``condition``."""
        return next(t for t, counts in self.samples if condition(counts))

    def _sample(self) -> None:
        while not self._stopping.is_set():
            self.samples.append((time.monotonic() - self.started, replica_counts(self._app)))
            time.sleep(0.1)


def replica_counts(app_name: str) -> dict[str, int]:
    deployment = serve.status().applications[app_name].deployments[ENGINE]
    states = deployment.replica_states.items()  # state names (ReplicaState values) as keys
    return {str(getattr(state, "value", state)): count for state, count in states if count}


def assert_unchanged(finished: list[Finished], expected: dict[str, list[int]]) -> None:
    changed = [f.request_id for f in finished if f.tokens != expected[f.prompt]]
    assert changed == [], (
        f"{len(changed)} of {len(finished)} streams differ from the fault-free run: {changed}"
    )


def two_running(counts: dict[str, int]) -> bool:
    return counts.get("RUNNING", 0) == 2


def one_left(counts: dict[str, int]) -> bool:
    return counts == {"RUNNING": 1}


def scale_up(stack: Stack, tag: str) -> Clients:
    """From one engine replica to two, under steady load that keeps two wanted until stopped."""
    wait_until(lambda: one_left(replica_counts(stack.config.app_name)), 120, "one engine replica")
    clients = Clients(stack, tag, STEADY)
    wait_until(lambda: two_running(replica_counts(stack.config.app_name)), 180, "a second engine replica")
    return clients


def test_a_burst_scales_one_engine_to_two_within_the_upscale_delay_plus_a_replica_start(
    stack: Stack, expected: dict[str, list[int]]
) -> None:
    wait_until(lambda: one_left(replica_counts(stack.config.app_name)), 120, "one engine replica")
    timeline = ReplicaTimeline(stack)
    burst = Clients(stack, "burst", BURST)
    burst.stop()  # one request each
    try:
        wait_until(lambda: any(two_running(c) for _, c in timeline.samples), 180, "a second engine replica")
    finally:
        timeline.stop()
    added = timeline.first(lambda counts: sum(counts.values()) > 1)  # Serve started one: STARTING
    running = timeline.first(two_running)
    print(f"\nburst -> second replica started {added:.2f} s, running {running:.2f} s")
    # Not before the delay (the queue was idle before the burst), and within it plus the time
    # a report takes; the replica's own start (running - added) comes on top.
    assert SCALING.upscale_delay_s <= added <= SCALING.upscale_delay_s + REPORT_SLACK_S
    assert_unchanged(burst.join(), expected)


def test_idle_engines_scale_back_down_to_one_after_the_downscale_delay(
    stack: Stack, expected: dict[str, list[int]]
) -> None:
    clients = scale_up(stack, "idle")
    timeline = ReplicaTimeline(stack)
    try:
        finished = clients.join()
        wait_until(lambda: any(one_left(c) for _, c in timeline.samples), 120, "one engine replica")
    finally:
        timeline.stop()
    assert_unchanged(finished, expected)
    ends = sorted(f.at - timeline.started for f in finished)
    # One replica is wanted from the moment at most target_per_replica requests are left.
    wanted_fewer, idle = ends[-int(SCALING.target_per_replica) - 1], ends[-1]
    stopping = timeline.first(lambda counts: counts.get("RUNNING", 0) < 2)
    gone = timeline.first(one_left)
    print(
        f"\nload <= target -> replica stopping {stopping - wanted_fewer:.2f} s; "
        f"last stream ended -> stopping {stopping - idle:.2f} s, stopped {gone - idle:.2f} s"
    )
    # A client sees a stream end a moment after the engine acknowledged it: half a second of that.
    assert stopping - wanted_fewer >= SCALING.downscale_delay_s - 0.5
    assert stopping - idle <= SCALING.downscale_delay_s + REPORT_SLACK_S


def test_requests_held_by_a_scaled_down_replica_are_handed_back_and_complete_unchanged(
    stack: Stack, expected: dict[str, list[int]]
) -> None:
    """Two replicas under steady load; then only ``HANDOFF_CLIENTS`` go on, more than both
    replicas' slots while one replica is wanted, so the one Serve stops holds requests. It hands
    them back and the other resumes them: every stream equals the fault-free one."""
    clients = scale_up(stack, "handoff")
    # Who holds each request entry, from Redis: the engines' consumer group names the consumer
    # of every pending entry. An entry that moves from one consumer to another was handed back.
    owners: dict[bytes, set[bytes]] = {}
    watching = threading.Event()
    band = QueueKeys(stack.config.queue.key_prefix).for_model(MODEL_NAME).requests  # priority 0

    def watch_owners() -> None:
        with redis.Redis.from_url(stack.config.redis_url) as client:
            while not watching.is_set():
                for entry in client.xpending_range(band, ENGINE_GROUP, "-", "+", 100):
                    owners.setdefault(entry["message_id"], set()).add(entry["consumer"])
                time.sleep(0.05)

    with ThreadPoolExecutor(max_workers=1) as pool:
        watcher = pool.submit(watch_owners)
        try:
            clients.stop(STEADY - HANDOFF_CLIENTS)
            wait_until(lambda: one_left(replica_counts(stack.config.app_name)), 120, "the scale-down")
            time.sleep(3.0)  # the handed-back requests resume on the survivor
        finally:
            finished = clients.join()
            watching.set()
        watcher.result()
    assert_unchanged(finished, expected)
    (survivor,) = stack.engine_statuses(1).values()
    moved = [consumers for consumers in owners.values() if len(consumers) > 1]
    assert moved, "no request of the stopped replica was handed to the survivor"
    assert all(survivor.consumer.encode() in consumers for consumers in moved)
    print(f"\nhanded back on scale-down and resumed by the survivor: {len(moved)} requests")
    wait_until(lambda: stack.unfinished_in_queue() == (0, 0), 30, "every request to be acknowledged")
