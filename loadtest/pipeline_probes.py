"""Per-stage measurements of `tokenline bench pipeline`, taken from outside services/.

Each probe times one piece the stack chains together, alone: the gRPC hops (against the
live stack), the Redis hops of a request (on the stack's Redis, through a probe model's
stream that no engine reads), tokenization and incremental detokenization (in-process).
Every probe returns seconds per sample, keyed by the stage names of
``loadtest.pipeline_report.STAGES``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from loadtest.pipeline_plan import HIGH

if TYPE_CHECKING:
    from services.queue import ClaimedRequest, QueueConfig
    from services.tokenizer.tokenizer import PromptTokenizer

PROBE_MODEL = "bench-probe"  # the queue probes use their own stream; no engine reads it
PROBE_WAIT_MS = 2000
SETTLE_S = 0.01  # how long a probe lets the other side block in Redis before acting


def _timed(call: Callable[..., object], *args: Any) -> float:
    """Seconds one ``call(*args)`` takes. Wall time only: ``contender.Stopwatch`` also reads
    the process's CPU clock inside the timed span, about 1 us, which would show in the
    microsecond stages (``detokenize_push``)."""
    begin = time.perf_counter()
    call(*args)
    return time.perf_counter() - begin


def probe_rpcs(target: str, api_key: str, prompts: Sequence[str], samples: int) -> dict[str, list[float]]:
    """Round trips of Tokenize (proxy -> ingress -> tokenizer deployment and back) and of
    ListModels (proxy -> ingress and back; the ingress answers from its caches)."""
    from services.client import TokenlineClient
    from services.proto.tokenline.v1 import generation_pb2 as pb

    tokenize = [pb.TokenizeRequest(text=prompts[i % len(prompts)]) for i in range(samples)]
    listing = pb.ListModelsRequest()
    metadata = (("authorization", f"Bearer {api_key}"),)
    with TokenlineClient(target) as client:
        stub = client.stub
        return {
            "tokenize_rpc": [_timed(stub.Tokenize, request, 10, metadata) for request in tokenize],
            "grpc_roundtrip": [_timed(stub.ListModels, listing, 10, metadata) for _ in range(samples)],
        }


class _QueueProbe:
    """The Redis hops of one request, on the stack's own Redis, through a probe model's
    stream that no engine reads: the same client classes and calls the stack uses."""

    def __init__(self, redis_url: str, queue_config: QueueConfig) -> None:
        from services.queue import EngineQueue, QueueClient

        self._loop = asyncio.new_event_loop()
        self._engine_queue = EngineQueue(redis_url, queue_config)
        self._client = QueueClient(redis_url, queue_config)
        self._engine_queue.ensure_group(PROBE_MODEL)
        self._consumer = f"bench-probe-{uuid.uuid4().hex[:8]}"
        self._claimed: list[ClaimedRequest] = []
        self._stamp = 0.0

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()
        self._engine_queue.close()

    def sample(self, width: int) -> dict[str, float]:
        from services.messages import GenerationRequest, SamplingParams, TokenChunk

        request_id = f"probe-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=4)
        request = GenerationRequest(request_id, PROBE_MODEL, tuple(range(3, 10)), params)
        out: dict[str, float] = {}
        # enqueue -> a claim already blocked in XREADGROUP: an idle replica's wait.
        claimer = self._in_background(self._claim)
        time.sleep(SETTLE_S)  # until the claimer's XREADGROUP is blocked in Redis
        begin = time.perf_counter()
        self._loop.run_until_complete(self._client.enqueue(request))
        out["queue_enqueue"] = time.perf_counter() - begin
        claimer.join()
        if not self._claimed:
            raise RuntimeError(f"queue probe: the request was not claimed within {PROBE_WAIT_MS} ms")
        out["queue_enqueue_to_claim"] = self._stamp - begin
        # A busy replica's poll for new work, once per loop iteration; here the stream is empty.
        out["replica_claim_poll"] = _timed(self._engine_queue.claim, PROBE_MODEL, self._consumer, 16, 0)
        # A replica's per-step write: every running request's chunk plus the cancel poll.
        for n in (1, width):
            ids = [request_id, *(f"{request_id}-{k}" for k in range(1, n))]
            chunks = [TokenChunk(rid, 0, (5,)) for rid in ids]
            out[f"replica_step_redis_{n}"] = _timed(
                self._engine_queue.append_and_poll_cancels, PROBE_MODEL, chunks, ids
            )
        # Output append -> a read already blocked in XREAD: the detokenizer's wait for a step.
        from services.queue import OutputCursor

        cursor = self._loop.run_until_complete(self._client.read(OutputCursor(request_id), block_ms=0))[1]
        appender = self._in_background(self._append_final, request_id, cursor.next_index)
        self._loop.run_until_complete(self._client.read(cursor, block_ms=PROBE_WAIT_MS))
        out["output_append_to_read"] = time.perf_counter() - self._stamp
        appender.join()
        self._engine_queue.finish(PROBE_MODEL, self._claimed.pop().entry_id, request_id)
        return out

    @staticmethod
    def _in_background(target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def _claim(self) -> None:
        self._claimed.extend(self._engine_queue.claim(PROBE_MODEL, self._consumer, 1, PROBE_WAIT_MS))
        self._stamp = time.perf_counter()

    def _append_final(self, request_id: str, index: int) -> None:
        from services.messages import FinishReason, TokenChunk

        time.sleep(SETTLE_S)  # until the caller's XREAD is blocked in Redis
        self._stamp = time.perf_counter()
        self._engine_queue.append([TokenChunk(request_id, index, (6,), FinishReason.LENGTH)])


def probe_queue(redis_url: str, queue_config: QueueConfig, samples: int) -> dict[str, list[float]]:
    probe = _QueueProbe(redis_url, queue_config)
    found: dict[str, list[float]] = {}
    try:
        for _ in range(samples):
            for name, seconds in probe.sample(HIGH).items():
                found.setdefault(name, []).append(seconds)
    finally:
        probe.close()
    return found


def probe_tokenizer(tokenizer: PromptTokenizer, prompts: Sequence[str], samples: int) -> list[float]:
    from services.tokenizer.prompt import TextPrompt

    requests = [TextPrompt(prompts[i % len(prompts)]) for i in range(samples)]
    return [_timed(tokenizer.encode, request) for request in requests]


def probe_detokenizer(tokenizer: PromptTokenizer, outputs: Sequence[Sequence[int]]) -> list[float]:
    """``IncrementalDetokenizer.push`` one token at a time, as the detokenizer gets them."""
    from services.detokenizer.incremental import IncrementalDetokenizer

    found: list[float] = []
    for ids in outputs:
        detokenizer = IncrementalDetokenizer(tokenizer)
        found.extend([_timed(detokenizer.push, (token_id,)) for token_id in ids])
    return found
