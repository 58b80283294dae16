"""Streaming clients over gRPC (asyncio) that honour RESOURCE_EXHAUSTED's retry hint.

One event loop drives every client: hundreds of concurrent streams cost the client process
one thread instead of hundreds, which leaves the cores to the stack under test. Requests are
greedy with EOS ignored, so each ``LoadRequest`` has one right answer: ``LoadTally`` keeps
the distinct token sequences seen per request (a bounded record, however long the run).

- ``closed_loop``: ``concurrency`` clients, each sending its next request when its previous
  one ended; a refused request is retried after the hint, for as long as the run lasts.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from services.proto.tokenline.v1 import generation_pb2 as pb
from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc

RETRY_HINT = re.compile(r"retry-after-ms=(\d+)")
STREAMS_PER_CHANNEL = 32  # HTTP/2 servers may cap concurrent streams per connection
RETRY_JITTER = 0.1  # a retry waits the hint plus up to this fraction of it
_FAILURE_EXAMPLES = 5


def retry_after_s(details: str | None) -> float | None:
    """The back-off a RESOURCE_EXHAUSTED refusal asks for, from its details, or None."""
    match = RETRY_HINT.search(details or "")
    return int(match.group(1)) / 1000.0 if match else None


@dataclass(frozen=True)
class LoadRequest:
    """One kind of request: greedy, EOS ignored, so it always yields the same tokens."""

    prompt: str
    max_tokens: int

    def message(self) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)
        return pb.GenerateRequest(text=self.prompt, sampling=sampling)


@dataclass
class LoadTally:
    """What the clients saw. ``refused`` counts attempts; a request refused twice and then
    served counts two refusals and one completion."""

    completed: int = 0
    refused: int = 0
    refused_without_hint: int = 0
    refusal_wait_s_total: float = 0.0  # call start -> refusal: what a refused client waits to hear it
    refusal_wait_s_max: float = 0.0
    tokens: int = 0
    index_errors: int = 0  # streams whose token indices had a gap or a duplicate
    in_flight: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # status code name -> attempts
    failure_examples: list[str] = field(default_factory=list)
    outputs: dict[LoadRequest, Counter[tuple[int, ...]]] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    @property
    def wall_s(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def refusal_wait_s_mean(self) -> float:
        return self.refusal_wait_s_total / self.refused if self.refused else 0.0

    @property
    def completed_per_s(self) -> float:
        return self.completed / self.wall_s if self.wall_s else 0.0

    def disagreements(self) -> dict[LoadRequest, int]:
        """Per request kind seen with more than one distinct output: how many distinct ones."""
        return {request: len(seen) for request, seen in self.outputs.items() if len(seen) > 1}

    def fail(self, code: str, details: str) -> None:
        self.failed[code] += 1
        if len(self.failure_examples) < _FAILURE_EXAMPLES:
            self.failure_examples.append(f"{code}: {details}")


class StreamingLoad:
    """Clients of one stack: ``target`` (HOST:PORT) with an API key."""

    def __init__(self, target: str, api_key: str, stream_timeout_s: float = 180.0) -> None:
        self._target = target
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout_s = stream_timeout_s

    async def closed_loop(
        self,
        requests: Sequence[LoadRequest],
        concurrency: int,
        duration_s: float,
        tally: LoadTally | None = None,
    ) -> LoadTally:
        """Run ``concurrency`` clients for ``duration_s``; requests still streaming then finish.

        ``tally``: filled as the run goes, for a caller that reports progress meanwhile."""
        if not requests:
            raise ValueError("closed_loop needs at least one request kind")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        tally = tally if tally is not None else LoadTally()
        tally.started = time.monotonic()
        stop_at = tally.started + duration_s
        channels = [
            grpc.aio.insecure_channel(self._target) for _ in range(-(-concurrency // STREAMS_PER_CHANNEL))
        ]
        kinds = itertools.cycle(requests)
        try:
            stubs = [pb_grpc.GenerationStub(channel) for channel in channels]
            clients = [
                self._client(stubs[index % len(stubs)], kinds, stop_at, tally) for index in range(concurrency)
            ]
            await asyncio.gather(*clients)
        finally:
            for channel in channels:
                await channel.close()
        tally.ended = time.monotonic()
        return tally

    async def _client(
        self,
        stub: pb_grpc.GenerationStub,
        kinds: itertools.cycle[LoadRequest],
        stop_at: float,
        tally: LoadTally,
    ) -> None:
        request = next(kinds)
        while time.monotonic() < stop_at:
            back_off = await self.attempt(stub, request, tally)
            if back_off is None:
                request = next(kinds)
            else:  # refused: the same request again after the hint, never past the end; the
                # jitter keeps clients refused together from all coming back in one burst
                delay = back_off * random.uniform(1.0, 1.0 + RETRY_JITTER)
                await asyncio.sleep(min(delay, max(0.0, stop_at - time.monotonic())))

    async def attempt(
        self, stub: pb_grpc.GenerationStub, request: LoadRequest, tally: LoadTally
    ) -> float | None:
        """One call, streamed to its end. Returns the back-off when refused, else None."""
        ids: list[int] = []
        in_order = True
        began = time.monotonic()
        tally.in_flight += 1
        try:
            call = stub.GenerateStream(request.message(), timeout=self._timeout_s, metadata=self._metadata)
            async for message in call:
                in_order = in_order and message.token_index == len(ids)
                ids.extend(message.token_ids)
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not ids:
                tally.refused += 1
                waited = time.monotonic() - began
                tally.refusal_wait_s_total += waited
                tally.refusal_wait_s_max = max(tally.refusal_wait_s_max, waited)
                hint = retry_after_s(details)
                if hint is None:
                    tally.refused_without_hint += 1
                return hint if hint is not None else 1.0
            tally.fail(code.name, details)
            return None
        finally:
            tally.in_flight -= 1
        tally.completed += 1
        tally.tokens += len(ids)
        tally.index_errors += not in_order
        tally.outputs.setdefault(request, Counter())[tuple(ids)] += 1
        return None
