"""Locust load test of tokenline's streaming RPC, ``Generation/GenerateStream``, over gRPC.

Each simulated user streams one request at a time (closed loop, no think time)
with a prompt of the demo task (addition, counting, facts). Every call reports
its own entries (request type ``grpc``), in milliseconds, counted as vLLM's
serving benchmark counts them (loadtest/stream_timing.py):

- ``GenerateStream``: the whole stream, start to end; response length = output
  tokens; a failed call (any gRPC error, or a stream that ends without a finish
  reason) carries the exception here;
- ``TTFT``: time to the first message that carries a token;
- ``ITL``: one sample per gap between consecutive token-carrying messages (a
  message with k tokens is one gap, not k - 1 gaps of zero);
- ``TPOT``: (end-to-end - TTFT) / (tokens - 1), one sample per call of two tokens
  or more.

When the run stops, a summary line gives output tokens/s (tokens of successful
calls over the run's wall time, from test start to test stop) and, when
``TOKENLINE_LOCUST_JSON`` names a file, every sample goes there too (exact
milliseconds: locust's own percentiles are rounded to 2 significant digits);
``tokenline bench load`` reads it.

Run it headless and bounded (N users for T seconds) against ``tokenline serve``,
whose gRPC endpoint locust takes from ``--host HOST:PORT``::

    tokenline serve &     # wait for "ready: grpc://127.0.0.1:50051"
    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:50051 \\
        --users 16 --spawn-rate 16 --run-time 60s --stop-timeout 30 --only-summary \\
        --csv bench-results/locust

The API key is ``TOKENLINE_API_KEY``, else the key ``tokenline serve`` wrote for
the local user (as ``tokenline generate`` does), else none (``serve --no-auth``).

``--run-time`` bounds the test, ``--stop-timeout`` lets running streams finish
(each call also has a deadline, ``TOKENLINE_TIMEOUT_S``), and ``--csv`` keeps the
percentiles. Knobs, from the environment: ``TOKENLINE_MAX_TOKENS`` (default 32),
``TOKENLINE_IGNORE_EOS`` (default 1: every request produces ``max_tokens``
tokens, so the load does not depend on what the model answers),
``TOKENLINE_MODEL`` (default: the server's), ``TOKENLINE_TIMEOUT_S`` (default 120),
``TOKENLINE_LOCUST_JSON`` (default: none).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import LocustError

from loadtest.pipeline_bench import demo_prompts
from loadtest.stream_timing import stream_timing
from services.client import TokenlineClient
from services.config import local_api_key_path
from services.proto.tokenline.v1 import generation_pb2 as pb

# Locust runs users as gevent greenlets: gRPC's blocking calls must yield to gevent.
# This has to run before any channel exists.
grpc_gevent.init_gevent()

MAX_TOKENS = int(os.environ.get("TOKENLINE_MAX_TOKENS", "32"))
IGNORE_EOS = os.environ.get("TOKENLINE_IGNORE_EOS", "1") not in ("0", "false", "")
MODEL = os.environ.get("TOKENLINE_MODEL", "")
TIMEOUT_S = float(os.environ.get("TOKENLINE_TIMEOUT_S", "120"))
SAMPLES_JSON = os.environ.get("TOKENLINE_LOCUST_JSON", "")
PROMPT_POOL = 512
STREAM, TTFT, ITL, TPOT = "GenerateStream", "TTFT", "ITL", "TPOT"
# Built once, when locust loads this file (the demo corpus import takes seconds): users
# that built their own while spawning would delay the start of the load.
PROMPTS = tuple(demo_prompts(PROMPT_POOL, seed=0))
# gevent's loop caches the time; after seconds of blocking work it would run locust's
# --run-time timer from a stale clock and stop the test as soon as it starts.
gevent.get_hub().loop.update_now()


def api_key() -> str | None:
    key = os.environ.get("TOKENLINE_API_KEY")
    if key:
        return key
    path = local_api_key_path()
    return path.read_text().strip() if path.exists() else None


class StreamIncompleteError(Exception):
    """The stream ended without a message carrying a finish reason."""


def grpc_target(host: str | None) -> str:
    """``HOST:PORT`` from locust's ``--host`` (a ``grpc://`` prefix is allowed)."""
    target = (host or "").strip().removeprefix("grpc://").rstrip("/")
    name, _, port = target.rpartition(":")
    if not name or not port.isdigit():
        raise LocustError(f"--host must be HOST:PORT of the gRPC endpoint (got {host!r})")
    return target


class GenerateStreamUser(User):
    wait_time = constant(0)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._client = TokenlineClient(grpc_target(self.host), api_key())

    def on_stop(self) -> None:
        self._client.close()

    @task
    def generate_stream(self) -> None:
        sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=IGNORE_EOS)
        request = pb.GenerateRequest(model=MODEL, text=random.choice(PROMPTS), sampling=sampling)
        arrivals: list[tuple[float, int]] = []
        exception: Exception | None = None
        start = time.perf_counter()
        try:
            finished = False
            for message in self._client.stream(request, TIMEOUT_S):
                arrivals.append((time.perf_counter(), len(message.token_ids)))
                finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            if not finished:
                tokens = sum(count for _, count in arrivals)
                raise StreamIncompleteError(f"stream ended after {tokens} tokens without a finish reason")
        except (grpc.RpcError, StreamIncompleteError) as error:
            exception = error
        timing = stream_timing(start, arrivals, time.perf_counter())
        self._report(STREAM, timing.e2e_s, timing.tokens, exception)
        if exception is not None:
            return
        if timing.ttft_s is not None:
            self._report(TTFT, timing.ttft_s)
        for gap in timing.itls_s:
            self._report(ITL, gap)
        if timing.tpot_s is not None:
            self._report(TPOT, timing.tpot_s)

    def _report(self, name: str, seconds: float, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=seconds * 1e3,
            response_length=length,
            exception=exception,
            context={},
        )


class RunSummary:
    """Every sample of one run, and output tokens per second over its wall time."""

    def __init__(self) -> None:
        self.samples_ms: dict[str, list[float]] = {STREAM: [], TTFT: [], ITL: [], TPOT: []}
        self.tokens = 0
        self.failures = 0
        self.started = self.stopped = time.time()

    def on_request(
        self, name: str, response_time: float, response_length: int, exception: Any, **_: Any
    ) -> None:
        if exception is not None:
            self.failures += 1
        elif name in self.samples_ms:
            self.samples_ms[name].append(response_time)
            if name == STREAM:
                self.tokens += response_length

    def as_dict(self, users: int) -> dict[str, Any]:
        wall_s = max(self.stopped - self.started, 1e-9)
        return {
            "users": users,
            "wall_s": wall_s,
            "requests": len(self.samples_ms[STREAM]),
            "failures": self.failures,
            "output_tokens": self.tokens,
            "tokens_per_s": self.tokens / wall_s,
            "samples_ms": self.samples_ms,
        }


@events.init.add_listener
def _collect_summary(environment: Environment, **_: Any) -> None:
    summary = RunSummary()
    environment.events.request.add_listener(summary.on_request)

    def on_start(**_: Any) -> None:
        summary.started = time.time()

    def on_stop(**_: Any) -> None:
        summary.stopped = time.time()
        users = environment.parsed_options.num_users if environment.parsed_options else 0
        result = summary.as_dict(users)
        print(
            f"tokenline: {result['output_tokens']} output tokens in {result['wall_s']:.1f} s = "
            f"{result['tokens_per_s']:.1f} tokens/s; {result['requests']} streams, "
            f"{result['failures']} failures",
            flush=True,
        )
        if SAMPLES_JSON:
            Path(SAMPLES_JSON).write_text(json.dumps(result))

    environment.events.test_start.add_listener(on_start)
    environment.events.test_stop.add_listener(on_stop)
