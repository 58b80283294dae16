"""512 concurrent open streams on one ingress replica: every stream completes, in order, while
the Redis connections of the whole stack stay a small constant and the ingress's memory
stays bounded. Before the one-reader data plane each open stream held its own blocking
Redis connection in the detokenizer, and each token crossed two Ray streaming hops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from services.config import AppConfig
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc
from services.queue.connection import MAX_ASYNC_CONNECTIONS
from tests.serving_stack import Stack, stack_config, start_stack
from tests.stack_probes import alive_pids

OWN_STACK = True  # runs before the shared stack exists (see conftest)
STREAMS = 512
MAX_TOKENS = 8
# The ingress's three Redis clients (queue, keys, rate limits) each pool at most
# MAX_ASYNC_CONNECTIONS; one of the queue's is the shared blocking read. Its tokenizer calls use
# one connection per call out (at most tokenizer_calls_in_flight) and one for the replies' read.
# Far below one per stream.
TOKENIZER_CALL_CONNECTIONS = AppConfig.model_fields["tokenizer_calls_in_flight"].default + 1
MAX_INGRESS_CONNECTIONS = 3 * MAX_ASYNC_CONNECTIONS + TOKENIZER_CALL_CONNECTIONS
MAX_INGRESS_GROWTH_BYTES = 128 * 2**20


@pytest.fixture(scope="module")
def big_queue_stack(demo_model_dir: Path) -> Iterator[Stack]:
    yield from start_stack(stack_config(str(demo_model_dir), engine_replicas=1, max_queue_depth=1024))


class _ClientSampler:
    """Samples the ingress process's TCP connections to Redis while the streams run."""

    def __init__(self, url: str, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            connections = self._process.net_connections(kind="tcp")
            to_redis = sum(1 for c in connections if c.raddr and c.raddr.port == self._port)
            self.peak = max(self.peak, to_redis)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_512_open_streams_on_one_ingress_replica(big_queue_stack: Stack) -> None:
    stack = big_queue_stack
    (ingress_pid,) = alive_pids("ingress")
    rss_before = psutil.Process(ingress_pid).memory_info().rss
    metadata = (("authorization", f"Bearer {stack.api_key}"),)

    async def run_all() -> list[list[int]]:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = pb_grpc.GenerationStub(channel)

            async def one(i: int) -> list[int]:
                sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                request = pb.GenerateRequest(
                    request_id=f"open-{i}", text=f"{i % 90 + 10}+3=", sampling=sampling
                )
                ids: list[int] = []
                async for message in stub.GenerateStream(request, metadata=metadata, timeout=300):
                    assert message.token_index == len(ids), "a gap or a duplicate in the stream"
                    ids.extend(message.token_ids)
                return ids

            return await asyncio.gather(*(one(i) for i in range(STREAMS)))

    sampler = _ClientSampler(stack.config.redis_url, ingress_pid)
    started = time.monotonic()
    try:
        outputs = asyncio.run(run_all())
    finally:
        peak_clients = sampler.stop()
    elapsed = time.monotonic() - started
    assert [len(ids) for ids in outputs] == [MAX_TOKENS] * STREAMS, "every stream complete"
    assert 0 < peak_clients <= MAX_INGRESS_CONNECTIONS, (
        f"the ingress held {peak_clients} Redis connections for {STREAMS} streams"
    )
    growth = psutil.Process(ingress_pid).memory_info().rss - rss_before
    assert growth <= MAX_INGRESS_GROWTH_BYTES, f"ingress grew {growth / 2**20:.0f} MiB in {elapsed:.0f} s"
