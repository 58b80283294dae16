"""Valid greedy streams that run in the background while a test module sends bad input,
and the checks that they and every replica came through unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from services.client import TokenlineClient
from tests.serving_stack import MODEL_NAME, Stack
from tests.test_faults import alive_pids, token_ids
from tests.test_faults import request as valid_request

BACKGROUND_PROMPTS = ("Count: 3 4 5", "12+35=", "Capital of Zorvia?")
DEPLOYMENTS = (f"engine-{MODEL_NAME}", "ingress", "tokenizer", "detokenizer")


@dataclass
class ValidTraffic:
    """Greedy streams that a background thread runs round after round, and what they returned."""

    stack: Stack
    pids: dict[str, set[int]]  # the replicas alive before the barrage, by deployment
    baseline: list[list[int]]  # the tokens of each prompt before the barrage
    results: list[tuple[int, list[int]]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="valid-traffic", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Stop after the round in progress, which completes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            assert not self._thread.is_alive(), "a valid stream hung"

    def _run(self) -> None:
        with TokenlineClient(self.stack.target, self.stack.api_key) as c:
            while not self._stop.is_set():
                for index, prompt in enumerate(BACKGROUND_PROMPTS):
                    try:
                        self.results.append(
                            (index, token_ids(c.stream(valid_request(prompt, max_tokens=16))))
                        )
                    except (grpc.RpcError, AssertionError) as error:  # a failure, or a gap in the stream
                        self.errors.append(error)


def watch_valid_traffic(stack: Stack) -> Iterator[ValidTraffic]:
    """For a module-scoped fixture: record the replicas and the baseline tokens, run the
    background streams for the module's tests, stop them at the end."""
    pids = {name: set(alive_pids(name)) for name in DEPLOYMENTS}
    with TokenlineClient(stack.target, stack.api_key) as c:
        baseline = [token_ids(c.stream(valid_request(p, max_tokens=16))) for p in BACKGROUND_PROMPTS]
    running = ValidTraffic(stack, pids, baseline)
    running.start()
    yield running
    running.finish()


def assert_unchanged(traffic: ValidTraffic) -> None:
    """Stop the background streams; each must have returned its baseline tokens, and every
    replica must be the one that was there before."""
    traffic.finish()
    assert not traffic.errors, f"valid streams failed during the barrage: {traffic.errors[:3]}"
    assert len(traffic.results) >= len(BACKGROUND_PROMPTS)
    for index, ids in traffic.results:
        assert ids == traffic.baseline[index], f"stream of {BACKGROUND_PROMPTS[index]!r} changed"
    for name, pids in traffic.pids.items():
        assert set(alive_pids(name)) == pids, f"a {name} replica died or was replaced"
