"""Many nodes: a real two-node Ray cluster on this machine (tests/two_node_cluster.py, run as
its own process) with one engine replica per node. Both replicas serve; SIGKILL of the
second node's raylet and every process under it (its workers, the engine replica among
them) in the middle of 16 streams loses nothing: every stream completes with the tokens
of a fault-free run, and nothing stays pending in the queue."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from services.client import TokenlineClient
from services.queue.keys import ENGINE_GROUP, QueueKeys
from tests.serving_stack import MODEL_NAME
from tests.stack_probes import request, wait_until
from tests.two_node_cluster import READY_PREFIX, STARTUP_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+35=", "40+7=", "Count: 3 4 5", "25+61="]
STREAMS = 16
MAX_TOKENS = 400  # long enough that the kill lands mid-stream even on an idle machine
FRONT_END = ("ingress", "tokenizer", "detokenizer")


@pytest.fixture(scope="module")
def two_nodes(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The cluster process's ready line (see tests/two_node_cluster.py); stopped afterwards."""
    log = tmp_path_factory.mktemp("two-nodes") / "cluster.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.two_node_cluster", str(demo_model_dir)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            start_new_session=True,
        )
    ready_lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None and process.stdin is not None
    stdout = process.stdout

    def read_stdout() -> None:
        for line in stdout:
            if line.startswith(READY_PREFIX):
                ready_lines.put(line.removeprefix(READY_PREFIX))

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S + 60
        while process.poll() is None and time.monotonic() < deadline and ready_lines.empty():
            time.sleep(0.5)
        try:
            ready = json.loads(ready_lines.get_nowait())
        except queue.Empty:
            text = log.read_text()
            first_error = text.find("Traceback")
            shown = text[first_error : first_error + 3000] if first_error >= 0 else ""
            pytest.fail(f"the two-node cluster did not come up:\n{shown}\n...\n{text[-3000:]}")
        yield ready
    finally:
        if process.poll() is None:
            process.stdin.write("stop\n")
            process.stdin.flush()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def replica_pids(app_name: str, deployment: str) -> list[int]:
    title = f"ServeReplica:{app_name}:{deployment}"
    return [
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if title in " ".join(p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def node_processes(raylet_pid: int) -> list[psutil.Process]:
    """The second node: its raylet and every process under it (workers, agents)."""
    raylet = psutil.Process(raylet_pid)
    return [raylet, *raylet.children(recursive=True)]


class Queue:
    """The model's request stream as the engines' consumer group sees it."""

    def __init__(self, ready: dict[str, Any]) -> None:
        self._redis = redis.Redis.from_url(ready["redis_url"], decode_responses=True)
        self._requests = QueueKeys(ready["key_prefix"]).for_model(MODEL_NAME).requests

    def held_by_pid(self) -> dict[int, int]:
        """Requests each engine replica holds (pending), by the pid in its consumer name
        (`host-pid-suffix`, see services/engine/replica.py)."""
        summary = self._redis.xpending(self._requests, ENGINE_GROUP)
        return {int(c["name"].rsplit("-", 2)[1]): int(c["pending"]) for c in summary["consumers"]}

    def pending(self) -> int:
        return int(self._redis.xpending(self._requests, ENGINE_GROUP)["pending"])


class Streams:
    """``STREAMS`` greedy streams at once, each checked for gaps, with live progress."""

    def __init__(self, ready: dict[str, Any], tag: str) -> None:
        self.progress = [0] * STREAMS
        self._ready, self._tag = ready, tag
        self._pool = ThreadPoolExecutor(max_workers=STREAMS)
        self._futures = [self._pool.submit(self._one, i) for i in range(STREAMS)]

    def _one(self, i: int) -> list[int]:
        with TokenlineClient(self._ready["target"], self._ready["api_key"]) as client:
            ids: list[int] = []
            prompt = PROMPTS[i % len(PROMPTS)]
            for message in client.stream(request(prompt, f"{self._tag}-{i}", MAX_TOKENS), timeout_s=180):
                assert message.token_index == len(ids), "a gap or a duplicate in the token stream"
                ids.extend(message.token_ids)
                self.progress[i] = len(ids)
            return ids

    def running(self) -> bool:
        return not all(f.done() for f in self._futures)

    def results(self) -> list[list[int]]:
        try:
            return [future.result(timeout=180) for future in self._futures]
        finally:
            self._pool.shutdown(wait=False)


def test_two_nodes_both_engines_serve_and_losing_a_node_loses_no_stream(two_nodes: dict[str, Any]) -> None:
    app = two_nodes["app_name"]
    assert two_nodes["nodes"] == 2
    second_node = {p.pid for p in node_processes(two_nodes["second_node_raylet_pid"])}
    engines = replica_pids(app, f"engine-{MODEL_NAME}")
    assert len(engines) == 2
    (remote_engine,) = [pid for pid in engines if pid in second_node]
    (head_engine,) = [pid for pid in engines if pid not in second_node]
    for deployment in FRONT_END:
        pids = replica_pids(app, deployment)
        assert pids and not set(pids) & second_node, f"{deployment} runs on the head node"

    print(f"cluster up in {two_nodes['startup_s']} s")
    requests = Queue(two_nodes)
    # Fault-free: 16 streams need both replicas (8 sequences each); both hold requests.
    holders: set[int] = set()
    calm_started = time.monotonic()
    calm = Streams(two_nodes, "calm")
    while calm.running():
        holders |= {pid for pid, held in requests.held_by_pid().items() if held}
        time.sleep(0.02)
    expected = calm.results()
    calm_s = time.monotonic() - calm_started
    assert holders == {head_engine, remote_engine}, "both engine replicas serve"
    assert all(len(tokens) == MAX_TOKENS for tokens in expected)
    assert expected[:4] == expected[4:8], "greedy: the same prompt gives the same tokens on either node"

    # The same 16 streams; the second node dies while its engine holds some of them mid-stream.
    faulty_started = time.monotonic()
    faulty = Streams(two_nodes, "faulty")
    deadline = time.monotonic() + 60
    while not (requests.held_by_pid().get(remote_engine, 0) > 0 and sum(faulty.progress) >= STREAMS):
        assert time.monotonic() < deadline, "the second node's engine never started streaming"
        time.sleep(0.01)
    held_when_killed = requests.held_by_pid()[remote_engine]
    unfinished_when_killed = sum(1 for n in faulty.progress if n < MAX_TOKENS)
    victims = node_processes(two_nodes["second_node_raylet_pid"])
    assert remote_engine in {p.pid for p in victims}
    for process in victims:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    assert held_when_killed > 0 and unfinished_when_killed > 0

    assert faulty.results() == expected, "every stream completes with the fault-free tokens"
    print(
        f"fault-free run {calm_s:.1f} s, run with the node killed {time.monotonic() - faulty_started:.1f} s"
    )
    wait_until(lambda: requests.pending() == 0, 30, "nothing pending in the consumer group")
    assert replica_pids(app, f"engine-{MODEL_NAME}") == [head_engine]
