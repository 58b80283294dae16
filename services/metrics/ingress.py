"""What an ingress replica records: latencies per call, prompt tokens, outcomes, RPC errors.

Per relayed message the cost is one clock read and one histogram observation; everything
per request (label dicts) is built once when the request is accepted.
"""

from __future__ import annotations

import time

from services.messages import FinishReason
from services.metrics import catalog
from services.metrics.ray_metrics import counter, histogram


class IngressMetrics:
    """The ingress's metrics; one instance per ingress replica."""

    def __init__(self) -> None:
        self.time_to_first_token = histogram(catalog.TIME_TO_FIRST_TOKEN)
        self.inter_token_latency = histogram(catalog.INTER_TOKEN_LATENCY)
        self.e2e_request_latency = histogram(catalog.E2E_REQUEST_LATENCY)
        self.tokenize_time = histogram(catalog.TOKENIZE_TIME)
        self.prompt_tokens = counter(catalog.PROMPT_TOKENS)
        self.request_success = counter(catalog.REQUEST_SUCCESS)
        self._rpc_errors = counter(catalog.RPC_ERRORS)

    def accepted(self, model: str, tenant: str, prompt_tokens: int) -> None:
        """A new request is durably queued (a duplicate of an accepted id is not counted again)."""
        self.prompt_tokens.inc(prompt_tokens, {"model": model, "tenant": tenant})

    def tokenized(self, model: str, seconds: float) -> None:
        """The tokenizer deployment answered for one prompt after ``seconds``."""
        self.tokenize_time.observe(seconds, {"model": model})

    def rpc_error(self, rpc: str, code_name: str) -> None:
        self._rpc_errors.inc(1, {"rpc": rpc, "code": code_name})

    def request_timer(self, model: str, tenant: str, received: float) -> RequestTimer:
        """Times one call from ``received`` (``time.monotonic()`` when the ingress got it)."""
        return RequestTimer(self, model, tenant, received)


class RequestTimer:
    """Latencies of one Generate/GenerateStream call, fed with each message relayed to it."""

    __slots__ = ("_last", "_metrics", "_model", "_received", "_tags", "_tenant")

    def __init__(self, metrics: IngressMetrics, model: str, tenant: str, received: float) -> None:
        self._metrics = metrics
        self._model = model
        self._tenant = tenant
        self._received = received
        self._last: float | None = None
        self._tags = {"model": model}

    def message(self, finish_reason: FinishReason | None) -> None:
        """One message is about to go to the client; ``finish_reason`` is set on the last one."""
        now = time.monotonic()
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._received, self._tags)
        else:
            self._metrics.inter_token_latency.observe(now - self._last, self._tags)
        self._last = now
        if finish_reason is not None:
            self._metrics.e2e_request_latency.observe(now - self._received, self._tags)
            outcome = {"model": self._model, "tenant": self._tenant, "finished_reason": finish_reason.value}
            self._metrics.request_success.inc(1, outcome)
