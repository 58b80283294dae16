"""Valid greedy streams that run in the background while a test module sends bad input,
and the checks that they and every replica came through unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tests.serving_stack import MODEL_NAME, Stack
from tests.stack_probes import SteadyStreams, alive_pids

BACKGROUND_PROMPTS = ("Count: 3 4 5", "12+35=", "Capital of Zorvia?")
DEPLOYMENTS = (f"engine-{MODEL_NAME}", "ingress", "tokenizer", "detokenizer")


@dataclass
class ValidTraffic:
    """The background streams, and the replicas alive before the barrage, by deployment."""

    streams: SteadyStreams
    pids: dict[str, set[int]]


def watch_valid_traffic(stack: Stack) -> Iterator[ValidTraffic]:
    """For a module-scoped fixture: record the replicas and the baseline tokens, run the
    background streams for the module's tests, stop them at the end."""
    pids = {name: set(alive_pids(name)) for name in DEPLOYMENTS}
    streams = SteadyStreams(stack.target, stack.api_key, BACKGROUND_PROMPTS, max_tokens=16, clients=1)
    try:
        yield ValidTraffic(streams, pids)
    finally:
        streams.stop()


def assert_unchanged(traffic: ValidTraffic) -> None:
    """Stop the background streams (a failed one raises); each must have returned its baseline
    tokens, and every replica must be the one that was there before."""
    traffic.streams.stop()
    assert len(traffic.streams.finished) >= len(BACKGROUND_PROMPTS)
    changed = traffic.streams.mismatched()
    assert not changed, f"streams of {sorted(set(changed))} changed"
    for name, pids in traffic.pids.items():
        assert set(alive_pids(name)) == pids, f"a {name} replica died or was replaced"
