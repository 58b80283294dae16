"""Faults on the real stack: processes killed with SIGKILL, a stuck engine loop, Redis killed
and restarted, a poison request, a rolling restart, client disconnects. See the README's
promise table."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from ray import serve
from ray.exceptions import RayError

from services.app import build_app
from services.client import TokenlineClient
from services.queue import codec
from services.queue.keys import QueueKeys
from tests.serving_stack import MODEL_NAME, Stack
from tests.stack_probes import SteadyStreams, alive_pids, request, seconds_until, token_ids, wait_until

PROMPTS = ["12+35=", "40+7=", "Count: 3 4 5", "25+61="]


def test_client_disconnect_stops_the_sequence_within_a_second(stack: Stack) -> None:
    def held() -> bool:
        return any("walk-away" in s.held_request_ids for s in stack.engine_statuses(2).values())

    with TokenlineClient(stack.target, stack.api_key) as client:
        stream = client.stream(request("1+2=", request_id="walk-away", max_tokens=2000))
        next(stream)
        assert held()
        stream.cancel()  # type: ignore[attr-defined]
    assert seconds_until(lambda: not held(), 1.0) < 1.0, "the engine must drop the sequence within a second"


def test_client_deadline_is_honoured_and_frees_the_engine(stack: Stack) -> None:
    def held() -> bool:
        return any("late" in s.held_request_ids for s in stack.engine_statuses(2).values())

    with TokenlineClient(stack.target, stack.api_key) as client:
        with pytest.raises(grpc.RpcError) as caught:
            token_ids(client.stream(request("1+2=", request_id="late", max_tokens=2000), timeout_s=0.5))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seconds_until(lambda: not held(), 1.0) < 1.0, "the engine must drop the expired request"


def test_ingress_killed_mid_stream_client_resumes_exactly_the_rest(stack: Stack) -> None:
    with TokenlineClient(stack.target, stack.api_key) as client:
        expected = token_ids(client.stream(request("Count: 3 4 5", max_tokens=60)))
        stream = client.stream(request("Count: 3 4 5", request_id="survivor", max_tokens=60))
        received: list[int] = []
        for message in stream:
            received.extend(message.token_ids)
            if len(received) >= 5:
                break
        (ingress_pid,) = alive_pids("ingress")
        os.kill(ingress_pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            for message in stream:
                received.extend(message.token_ids)
        rest: list[int] = []
        deadline = time.monotonic() + 90
        while True:  # the proxy answers UNAVAILABLE until Serve has started a new ingress
            try:
                rest = []
                for message in client.resume("survivor", len(received)):
                    assert message.token_index == len(received) + len(rest)
                    rest.extend(message.token_ids)
                break
            except grpc.RpcError as error:
                assert time.monotonic() < deadline, f"resume kept failing: {error.code()}"
                time.sleep(1)
    assert received + rest == expected


def test_stuck_engine_loop_fails_health_and_its_requests_complete(stack: Stack) -> None:
    def one(i: int) -> list[int]:
        with TokenlineClient(stack.target, stack.api_key) as c:
            return token_ids(c.stream(request(PROMPTS[i % 4], max_tokens=60)))

    handle = serve.get_deployment_handle(f"engine-{MODEL_NAME}", app_name=stack.config.app_name)
    with ThreadPoolExecutor(max_workers=8) as pool:
        baseline = list(pool.map(one, range(8)))
        running = [pool.submit(one, i) for i in range(8)]
        handle.pause_loop.remote().result(timeout_s=10)
        frozen: list[int] = []
        wait_until(
            lambda: bool(
                frozen.extend(
                    pid for pid, s in stack.engine_statuses(2).items() if s.seconds_since_progress > 1
                )
                or frozen
            ),
            10,
            "a replica to freeze",
        )
        results = [future.result(timeout=120) for future in running]
    assert results == baseline, "the frozen replica's requests must be reclaimed and finish unchanged"
    # Its health check fails and Serve replaces it with a replica that makes progress.
    wait_until(lambda: frozen[0] not in alive_pids(f"engine-{MODEL_NAME}"), 120, "Serve to replace it")
    wait_until(lambda: len(stack.engine_statuses(2)) == 2, 120, "two live engine replicas")


def test_engine_replica_killed_with_64_in_flight_loses_nothing(stack: Stack) -> None:
    """SIGKILL of a replica while 64 greedy streams run on two: every stream completes with
    the fault-free text, no index twice, and nothing stays pending in the consumer group."""
    count = 64

    def run_all(tag: str) -> list[list[int]]:
        def one(i: int) -> list[int]:
            with TokenlineClient(stack.target, stack.api_key) as c:
                return token_ids(c.stream(request(PROMPTS[i % 4], request_id=f"{tag}-{i}", max_tokens=48)))

        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(one, range(count)))

    baseline = run_all("calm")
    with ThreadPoolExecutor(max_workers=1) as background:
        faulty = background.submit(run_all, "kill9")
        kill_the_busier_of_two(
            lambda: {pid: s.held_request_ids for pid, s in stack.engine_statuses(2).items()},
            "the two replicas never held work at the same time",
        )
        results = faulty.result(timeout=240)
    assert results == baseline
    wait_until(lambda: stack.unfinished_in_queue() == (0, 0), 10, "every request to be acknowledged")


def test_detokenizer_replica_killed_mid_stream_loses_nothing(stack: Stack) -> None:
    """SIGKILL of the detokenizer replica that renders most of 16 streams: a live replica takes
    its requests over after the lease and rebuilds their text from the token streams; every
    client sees the fault-free tokens and text, each index once, in order."""
    count = 16

    def run_all(tag: str) -> list[tuple[list[int], str]]:
        def one(i: int) -> tuple[list[int], str]:
            ids: list[int] = []
            text: list[str] = []
            with TokenlineClient(stack.target, stack.api_key) as c:
                for message in c.stream(request(PROMPTS[i % 4], request_id=f"{tag}-{i}", max_tokens=120)):
                    assert message.token_index == len(ids), "a gap or a duplicate in the stream"
                    ids.extend(message.token_ids)
                    text.append(message.text)
            return ids, "".join(text)

        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(one, range(count)))

    baseline = run_all("detok-calm")
    with ThreadPoolExecutor(max_workers=1) as background:
        faulty = background.submit(run_all, "detok-kill9")
        kill_the_busier_of_two(
            lambda: stack.detokenizer_owners(2),
            "the two detokenizer replicas never owned streams at the same time",
        )
        results = faulty.result(timeout=240)
    assert results == baseline
    wait_until(lambda: len(stack.detokenizer_owners(2)) == 2, 120, "Serve to restore two detokenizers")


def test_tokenizer_replica_killed_loses_no_request(stack: Stack) -> None:
    """SIGKILL of the tokenizer replica while 8 clients send short requests back to back: the
    calls it took and never answered, and those sent while no replica runs, wait in Redis and
    are answered by its replacement; no client sees an error, every stream is fault-free."""
    streams = SteadyStreams(stack.target, stack.api_key, PROMPTS, max_tokens=8, clients=8)
    try:
        wait_until(lambda: len(streams.finished) >= 16, 60, "streams to run")
        (tokenizer_pid,) = alive_pids("tokenizer")
        os.kill(tokenizer_pid, signal.SIGKILL)
        finished_at_kill = len(streams.finished)
        wait_until(lambda: alive_pids("tokenizer") not in ([], [tokenizer_pid]), 120, "a new tokenizer")
        wait_until(lambda: len(streams.finished) >= finished_at_kill + 32, 120, "streams after the kill")
    finally:
        streams.stop()  # a stream that failed raises here
    assert streams.mismatched() == []


def kill_the_busier_of_two(requests_by_pid: Callable[[], dict[int, tuple[str, ...]]], never: str) -> None:
    """SIGKILL, as soon as both of two replicas hold requests, the one holding more."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = requests_by_pid()
        if len(held) == 2 and all(held.values()):
            os.kill(max(held, key=lambda pid: len(held[pid])), signal.SIGKILL)
            return
    raise AssertionError(never)


def output_chunk_starts(stack: Stack, request_id: str) -> list[int]:
    """Start index of every chunk the engines wrote for the request, in stream order."""
    key = QueueKeys(stack.config.queue.key_prefix).output(request_id)
    with redis.Redis.from_url(stack.config.redis_url) as client:
        entries = client.xrange(key)
    return [chunk.start_index for _, chunk in codec.decode_chunk_entries(request_id, entries)]


class PatientClient:
    """A client that rides out UNAVAILABLE as the stack tells it to: before the request was
    accepted, send it again with the same id; after tokens arrived, Resume from the next one."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self.unavailable = 0

    def stream(self, prompt: str, request_id: str, max_tokens: int) -> list[int]:
        received: list[int] = []
        with TokenlineClient(self._stack.target, self._stack.api_key) as client:
            messages = client.stream(request(prompt, request_id=request_id, max_tokens=max_tokens))
            while True:
                try:
                    for message in messages:  # not token_ids(): what arrived before an error counts
                        assert message.token_index == len(received), "a gap or a duplicate in the stream"
                        received.extend(message.token_ids)
                    return received
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                    self.unavailable += 1
                    time.sleep(0.5)
                    if received:
                        messages = client.resume(request_id, len(received))
                    else:
                        messages = client.stream(
                            request(prompt, request_id=request_id, max_tokens=max_tokens)
                        )


def test_redis_killed_and_restarted_under_load_loses_nothing(stack: Stack) -> None:
    """SIGKILL of Redis (AOF, appendfsync always) for longer than the engines' leases while
    16 streams run and 8 new requests arrive. Streams in flight finish with the fault-free
    tokens without an error; new requests are refused with UNAVAILABLE until Redis is back,
    are sent again with the same id, and run exactly once (their output starts at 0 once)."""
    in_flight_tokens, outage_s = 160, 7.0
    with TokenlineClient(stack.target, stack.api_key) as client:
        expected = {p: token_ids(client.stream(request(p, max_tokens=in_flight_tokens))) for p in PROMPTS}
    calm, arriving = PatientClient(stack), PatientClient(stack)
    with ThreadPoolExecutor(max_workers=24) as pool:
        running = {
            f"redis-inflight-{i}": pool.submit(
                calm.stream, PROMPTS[i % 4], f"redis-inflight-{i}", in_flight_tokens
            )
            for i in range(16)
        }
        wait_until(
            lambda: sum(len(s.held_request_ids) for s in stack.engine_statuses(2).values()) >= 16,
            30,
            "streams",
        )
        stack.redis_server.kill()
        late = {
            f"redis-arriving-{i}": pool.submit(arriving.stream, PROMPTS[i % 4], f"redis-arriving-{i}", 40)
            for i in range(8)
        }
        time.sleep(outage_s)
        stack.redis_server.restart()
        results = {rid: future.result(timeout=180) for rid, future in running.items()}
        late_results = {rid: future.result(timeout=180) for rid, future in late.items()}
    assert calm.unavailable == 0, "a stream in flight must wait for Redis, not fail"
    for i, rid in enumerate(results):
        assert results[rid] == expected[PROMPTS[i % 4]]
    assert arriving.unavailable > 0, "requests sent during the outage must have been refused"
    for i, rid in enumerate(late_results):
        assert late_results[rid] == expected[PROMPTS[i % 4]][:40]
        starts = output_chunk_starts(stack, rid)
        assert starts == sorted(set(starts)), f"{rid} was run more than once: chunk starts {starts}"
    wait_until(lambda: stack.unfinished_in_queue() == (0, 0), 10, "every request to be acknowledged")


def test_rolling_restart_under_load_fails_and_truncates_no_stream(stack: Stack) -> None:
    """A new version of the application rolled out while 12 clients stream back to back: every
    replica is replaced (Serve restarts all deployments of a redeployed app, one at a time),
    and each stream is complete and equal to the fault-free one. Stopping engines drain and
    hand back what they hold; stopping ingress and detokenizer replicas finish their streams."""
    engine = f"engine-{MODEL_NAME}"
    old_engines, old_ingresses = set(alive_pids(engine)), set(alive_pids("ingress"))

    def replaced() -> bool:
        engines, ingresses = set(alive_pids(engine)), set(alive_pids("ingress"))
        fresh = not engines & old_engines and not ingresses & old_ingresses
        return fresh and len(engines) == 2 and bool(ingresses)

    (model,) = stack.config.models
    new_engine = model.model_copy(update={"engine_stall_after_s": model.engine_stall_after_s + 1})
    new_version = stack.config.model_copy(update={"models": (new_engine,)})
    streams = SteadyStreams(stack.target, stack.api_key, PROMPTS, max_tokens=120, clients=12)
    try:
        wait_until(lambda: len(streams.finished) >= 12, 60, "steady streaming")
        before = len(streams.finished)
        serve.run(build_app(new_version), name=stack.config.app_name)
        wait_until(replaced, 180, "every old engine and ingress replica to be replaced")
        during = len(streams.finished)
    finally:
        streams.stop()  # a failed stream raises here
    assert during > before, "streams must have completed while the replicas were replaced"
    mismatched = streams.mismatched()
    assert mismatched == [], (
        f"{len(mismatched)} of {len(streams.finished)} streams differ from the fault-free run"
    )


def replica_holding(stack: Stack, request_id: str) -> int | None:
    """PID of the engine replica that holds the request now, if one answers that it does."""
    try:
        statuses = stack.engine_statuses(2, attempts=8)
    except (RayError, TimeoutError):  # a replica just died and Serve still routes to it
        return None
    return next((pid for pid, status in statuses.items() if request_id in status.held_request_ids), None)


def dead_letters(stack: Stack) -> dict[str, int]:
    """Request id -> deliveries, for every entry in the model's dead-letter stream."""
    key = QueueKeys(stack.config.queue.key_prefix).for_model(MODEL_NAME).dead
    with redis.Redis.from_url(stack.config.redis_url) as client:
        entries = client.xrange(key)
    return {str(codec.request_id_of(fields)): int(fields[b"deliveries"]) for _, fields in entries}


def test_poison_request_is_dead_lettered_and_harms_no_one_else(stack: Stack) -> None:
    """A request that takes down every replica that runs it (SIGKILL whenever one holds it,
    as an out-of-memory kill or a crash in a kernel would): after max_deliveries hand-outs
    it goes to the dead-letter stream, its client gets ABORTED with the reason, and the
    requests streaming meanwhile finish with the fault-free tokens."""
    limit = stack.config.queue.max_deliveries

    def poison() -> grpc.RpcError:
        with TokenlineClient(stack.target, stack.api_key) as c, pytest.raises(grpc.RpcError) as caught:
            token_ids(c.stream(request("1+2=", request_id="poison", max_tokens=2000), timeout_s=300))
        return caught.value

    victims: list[int] = []
    bystanders = SteadyStreams(stack.target, stack.api_key, PROMPTS, max_tokens=24, clients=4)
    with ThreadPoolExecutor(max_workers=1) as pool:
        refusal = pool.submit(poison)
        try:
            deadline = time.monotonic() + 240
            while not refusal.done():
                assert time.monotonic() < deadline, f"the poison request was never dead-lettered ({victims=})"
                holder = replica_holding(stack, "poison")
                if holder is not None and holder not in victims:
                    time.sleep(1.0)  # requests reclaimed along with it finish before the crash
                    os.kill(holder, signal.SIGKILL)
                    victims.append(holder)
                time.sleep(0.1)
        finally:
            bystanders.stop()
        error = refusal.result()
    assert error.code() == grpc.StatusCode.ABORTED
    assert f"delivered {limit + 1} times" in (error.details() or "")
    assert len(victims) == limit, "each delivery but the last one crashed a replica"
    assert dead_letters(stack).get("poison") == limit + 1
    assert bystanders.finished and bystanders.mismatched() == []
    wait_until(
        lambda: len(alive_pids(f"engine-{MODEL_NAME}")) == 2, 120, "Serve to replace the crashed replicas"
    )
    wait_until(lambda: stack.unfinished_in_queue() == (0, 0), 30, "nothing left pending")
