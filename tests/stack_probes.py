"""Probes of the running test stack shared by the end-to-end tests: greedy requests, token
streams checked for gaps, waiting on conditions, and the processes of Serve's replicas."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import psutil

from services.client import TokenlineClient
from services.proto.tokenline.v1 import generation_pb2 as pb


def request(prompt: str, request_id: str = "", max_tokens: int = 40) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(request_id=request_id, text=prompt, sampling=sampling)


def token_ids(messages: Iterator[pb.GenerateStreamResponse]) -> list[int]:
    ids: list[int] = []
    for message in messages:
        assert message.token_index == len(ids), "a gap or a duplicate in the token stream"
        ids.extend(message.token_ids)
    return ids


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def seconds_until(condition: Callable[[], bool], limit_s: float) -> float:
    """Seconds from now to the start of the first poll that finds ``condition`` true. A poll
    asks every engine replica through Serve and can itself take a few hundred ms on a loaded
    machine, so the start of the poll, not its end, dates the observation."""
    started = time.monotonic()
    while True:
        polled_at = time.monotonic() - started
        if condition():
            return polled_at
        assert polled_at < 5 * limit_s, "condition never became true"
        time.sleep(0.05)


def alive_pids(deployment: str) -> list[int]:
    """PIDs of the live replicas of a deployment: Ray titles each replica process after it."""
    title = f"ServeReplica:tokenline:{deployment}"
    pids = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if title in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            pids.append(process.pid)
    return pids


class SteadyStreams:
    """Clients that stream greedy requests back to back, round-robin over ``prompts``, until
    stopped, and what each stream returned: load to run a fault under, checked afterwards
    against the fault-free tokens of each prompt (taken when the object is made)."""

    def __init__(
        self, target: str, api_key: str, prompts: Sequence[str], max_tokens: int, clients: int
    ) -> None:
        self._target, self._api_key = target, api_key
        self._prompts, self._max_tokens = tuple(prompts), max_tokens
        with TokenlineClient(target, api_key) as client:
            self.expected = {
                p: token_ids(client.stream(request(p, max_tokens=max_tokens))) for p in self._prompts
            }
        self.finished: list[tuple[str, list[int]]] = []
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=clients)
        self._clients = [self._pool.submit(self._stream, worker) for worker in range(clients)]

    def stop(self) -> None:
        """Let the streams in progress complete; a stream that failed raises here."""
        self._stopping.set()
        try:
            for future in self._clients:
                future.result(timeout=180)
        finally:
            self._pool.shutdown(wait=False)

    def mismatched(self) -> list[str]:
        """Prompts of the finished streams whose tokens differ from the fault-free run."""
        return [prompt for prompt, tokens in self.finished if tokens != self.expected[prompt]]

    def _stream(self, worker: int) -> None:
        with TokenlineClient(self._target, self._api_key) as client:
            for i in itertools.count():
                if self._stopping.is_set():
                    return
                prompt = self._prompts[(worker + i) % len(self._prompts)]
                self.finished.append(
                    (prompt, token_ids(client.stream(request(prompt, max_tokens=self._max_tokens))))
                )
