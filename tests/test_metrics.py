"""Prometheus metrics on a real stack: known traffic in, the node's scrape checked against it.

A stack of its own (one engine replica, a metrics port of its own) so that nothing but this
module's traffic is counted: four greedy streams of exactly ``MAX_TOKENS`` tokens, one request
refused with INVALID_ARGUMENT and one with UNAUTHENTICATED. Ray's metrics agent exports what
the processes report every few seconds, so the checks poll the scrape with a bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.client import TokenlineClient
from services.metrics import catalog
from services.proto.tokenline.v1 import generation_pb2 as pb
from tests.metrics_scrape import Scrape, poll, scrape
from tests.serving_stack import MODEL_NAME, Stack, free_port, stack_config, start_stack

OWN_STACK = True
PROMPTS = ("12+35=", "Count: 3 4 5", "40+7=", "25+61=")
MAX_TOKENS = 8
TENANT = "tester"  # the tenant of the stack's test key
EXPORT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Traffic:
    prompt_tokens: int  # from Tokenize
    tokens_received: int
    messages_per_stream: tuple[int, ...]


@pytest.fixture(scope="module")
def metrics_stack(demo_model_dir: Path) -> Iterator[Stack]:
    config = stack_config(str(demo_model_dir), engine_replicas=1)
    yield from start_stack(config.model_copy(update={"metrics_port": free_port()}))


@pytest.fixture(scope="module")
def traffic(metrics_stack: Stack) -> Traffic:
    with TokenlineClient(metrics_stack.target, metrics_stack.api_key) as client:
        prompt_tokens = sum(client.tokenize(pb.TokenizeRequest(text=p)).count for p in PROMPTS)
        received, messages = 0, []
        for prompt in PROMPTS:
            request = pb.GenerateRequest(text=prompt)
            request.sampling.temperature = 0.0
            request.sampling.max_tokens = MAX_TOKENS
            request.sampling.ignore_eos = True
            responses = list(client.stream(request))
            received += sum(len(r.token_ids) for r in responses)
            messages.append(len(responses))
        bad = pb.GenerateRequest(text=PROMPTS[0])
        bad.sampling.temperature = -1.0
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with TokenlineClient(metrics_stack.target, "tl_" + "a" * 43) as stranger:
        with pytest.raises(grpc.RpcError) as unauthenticated:
            list(stranger.stream(pb.GenerateRequest(text=PROMPTS[0])))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return Traffic(prompt_tokens, received, tuple(messages))


def _name(spec: catalog.MetricSpec, suffix: str = "") -> str:
    return spec.scrape_name + suffix


def _expected(traffic: Traffic) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(series name, labels) -> the total the scrape must show for this module's traffic."""
    model = (("model", MODEL_NAME),)
    streams = float(len(PROMPTS))
    finished = (*model, ("tenant", TENANT), ("finished_reason", "length"))
    return {
        (_name(catalog.REQUEST_SUCCESS), finished): streams,
        (_name(catalog.PROMPT_TOKENS), (*model, ("tenant", TENANT))): traffic.prompt_tokens,
        (_name(catalog.GENERATION_TOKENS), model): traffic.tokens_received,
        (_name(catalog.TIME_TO_FIRST_TOKEN, "_count"), model): streams,
        (_name(catalog.E2E_REQUEST_LATENCY, "_count"), model): streams,
        (_name(catalog.INTER_TOKEN_LATENCY, "_count"), model): sum(traffic.messages_per_stream) - streams,
        (_name(catalog.REQUEST_QUEUE_TIME, "_count"), model): streams,
        # Every prompt is tokenized twice: by Tokenize and by its stream (the refused calls never are).
        (_name(catalog.TOKENIZE_TIME, "_count"), model): 2 * streams,
        (_name(catalog.RPC_ERRORS), (("rpc", "Generate"), ("code", "INVALID_ARGUMENT"))): 1.0,
        (_name(catalog.RPC_ERRORS), (("rpc", "GenerateStream"), ("code", "UNAUTHENTICATED"))): 1.0,
        # After the traffic: nothing runs, waits or is queued.
        (_name(catalog.NUM_REQUESTS_RUNNING), model): 0.0,
        (_name(catalog.NUM_REQUESTS_WAITING), model): 0.0,
        (_name(catalog.QUEUE_DEPTH), model): 0.0,
    }


def _mismatches(traffic: Traffic) -> Callable[[Scrape], list[str]]:
    expected = _expected(traffic)

    def check(current: Scrape) -> list[str]:
        wrong = []
        for (name, labels), value in expected.items():
            found = current.matching(name, **dict(labels))
            total = sum(s.value for s in found)
            if not found or total != value:
                wrong.append(f"{name}{dict(labels)}: {total if found else 'absent'}, expected {value}")
        return wrong

    return check


def test_scrape_counts_the_traffic_sent(metrics_stack: Stack, traffic: Traffic) -> None:
    assert traffic.tokens_received == len(PROMPTS) * MAX_TOKENS  # ignore_eos: every stream is full
    _, wrong = poll(metrics_stack.metrics_url, _mismatches(traffic), EXPORT_TIMEOUT_S)
    assert not wrong, "scrape disagrees with the traffic sent:\n" + "\n".join(wrong)


def test_latency_histograms_are_consistent(metrics_stack: Stack, traffic: Traffic) -> None:
    current = scrape(metrics_stack.metrics_url)
    for spec, calls in (
        (catalog.TIME_TO_FIRST_TOKEN, len(PROMPTS)),
        (catalog.E2E_REQUEST_LATENCY, len(PROMPTS)),
        (catalog.REQUEST_QUEUE_TIME, len(PROMPTS)),
        (catalog.TOKENIZE_TIME, 2 * len(PROMPTS)),  # Tokenize and GenerateStream
    ):
        count = current.total(_name(spec, "_count"), model=MODEL_NAME)
        assert count == calls, spec.name
        seconds = current.total(_name(spec, "_sum"), model=MODEL_NAME)
        assert 0.0 < seconds < count * 120.0, f"{spec.name}: {seconds}s over {count} requests"
        assert current.total(_name(spec, "_bucket"), model=MODEL_NAME, le="+Inf") == count
    # Bucket counts are exact (Ray rebuilds _sum from bucket midpoints): a request's first
    # message comes no later than its last, so at every bound both histograms share, at least
    # as many first messages as whole requests fall below it.
    shared = set(catalog.TIME_TO_FIRST_TOKEN.buckets) & set(catalog.E2E_REQUEST_LATENCY.buckets)
    assert len(shared) >= 5
    for bound in sorted(shared):
        le = str(bound)
        ttft = current.total(_name(catalog.TIME_TO_FIRST_TOKEN, "_bucket"), model=MODEL_NAME, le=le)
        e2e = current.total(_name(catalog.E2E_REQUEST_LATENCY, "_bucket"), model=MODEL_NAME, le=le)
        assert ttft >= e2e, f"le={le}: {ttft} first messages but {e2e} whole requests"


def test_gauges_and_names_are_the_catalog(metrics_stack: Stack, traffic: Traffic) -> None:
    current = scrape(metrics_stack.metrics_url)
    usage = current.matching(_name(catalog.KV_CACHE_USAGE), model=MODEL_NAME)
    assert usage, "no KV-cache usage reported"
    assert all(0.0 <= s.value <= 1.0 for s in usage)
    shown = current.names(catalog.SCRAPE_PREFIX + "tokenline")
    assert shown <= catalog.scrape_names(), f"not in the catalog: {shown - catalog.scrape_names()}"
    # Ray exports a counter once it was incremented: no preemption happened in this traffic.
    missing = catalog.scrape_names() - shown - {_name(catalog.NUM_PREEMPTIONS)}
    assert not missing, f"catalog metrics the scrape lacks: {sorted(missing)}"
