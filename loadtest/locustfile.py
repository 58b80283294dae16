"""Locust load test of tokenline's streaming RPC, ``Generation/GenerateStream``, over gRPC.

Each simulated user streams one request at a time (closed loop, no think time)
with a prompt of the demo task (addition, counting, facts) and reports two
request events per call:

- ``GenerateStream``: response time = time to the *last* token (the whole
  stream), response length = output tokens; a failed call (any gRPC error, or a
  stream that ends without a finish reason) carries the exception here;
- ``GenerateStream TTFT``: response time = time to the first token.

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
``TOKENLINE_MODEL`` (default: the server's), ``TOKENLINE_TIMEOUT_S`` (default 120).
"""

from __future__ import annotations

import os
import random
import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, task
from locust.exception import LocustError

from loadtest.pipeline_bench import demo_prompts
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
PROMPT_POOL = 512


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
        self._prompts = demo_prompts(PROMPT_POOL, seed=random.randrange(1 << 30))

    def on_stop(self) -> None:
        self._client.close()

    @task
    def generate_stream(self) -> None:
        sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=IGNORE_EOS)
        request = pb.GenerateRequest(model=MODEL, text=random.choice(self._prompts), sampling=sampling)
        tokens = 0
        first: float | None = None
        exception: Exception | None = None
        start = time.perf_counter()
        try:
            finished = False
            for message in self._client.stream(request, TIMEOUT_S):
                if message.token_ids and first is None:
                    first = time.perf_counter()
                tokens += len(message.token_ids)
                finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            if not finished:
                raise StreamIncompleteError(f"stream ended after {tokens} tokens without a finish reason")
        except (grpc.RpcError, StreamIncompleteError) as error:
            exception = error
        end = time.perf_counter()
        events = self.environment.events
        events.request.fire(
            request_type="grpc",
            name="GenerateStream",
            response_time=(end - start) * 1e3,
            response_length=tokens,
            exception=exception,
            context={},
        )
        if first is not None:
            events.request.fire(
                request_type="grpc",
                name="GenerateStream TTFT",
                response_time=(first - start) * 1e3,
                response_length=0,
                exception=None,
                context={},
            )
