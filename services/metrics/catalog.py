"""Every metric tokenline exports: name, kind, meaning, labels, buckets. One place.

Metrics go through Ray's metrics API (``ray.util.metrics``): every process of a Ray node
(ingress, engine replicas) reports to that node's metrics agent, which serves them all on
one Prometheus endpoint, so one scrape per node sees the whole node, however many replicas
run on it. ``prometheus_client`` would need a port per process instead.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``tokenline_time_to_first_token_seconds``)
with the same meanings where vLLM has one. Ray 2.60 exports through OpenTelemetry, which does
not take ``:`` in a name: a ``tokenline:`` metric is dropped (a FutureWarning, nothing in the
scrape), so the names here use ``_``. The agent prepends ``ray_``: a scrape shows
``ray_tokenline_...`` (see ``scrape_names``), with the labels below plus Ray's own
(``WorkerId``, ``NodeAddress``, ``Component``, ``SessionName``, ``Version``): one series per
process, which a query sums over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SCRAPE_PREFIX = "ray_"  # what Ray's metrics agent puts in front of every application metric


class Kind(str, enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as given to Ray; counters end in _total, which the exporter keeps as it is
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # histograms: upper bounds in seconds

    @property
    def scrape_name(self) -> str:
        return SCRAPE_PREFIX + self.name

    @property
    def series_names(self) -> frozenset[str]:
        """The names of its series in a scrape: a histogram's ``_bucket``, ``_count``, ``_sum``."""
        if self.kind is Kind.HISTOGRAM:
            return frozenset(self.scrape_name + suffix for suffix in ("_bucket", "_count", "_sum"))
        return frozenset({self.scrape_name})


# Latency buckets in seconds: fine below 100 ms, where a small model's gaps between tokens
# lie, and coarse up to minutes, where queueing under overload and long generations end.
_SHORT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_LONG = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

_MODEL = ("model",)
_MODEL_TENANT = ("model", "tenant")

TIME_TO_FIRST_TOKEN = MetricSpec(
    "tokenline_time_to_first_token_seconds",
    Kind.HISTOGRAM,
    "From the ingress receiving a Generate/GenerateStream call to the first text it relays.",
    _MODEL,
    (*_SHORT, 10.0, 20.0, 40.0, 80.0),
)
INTER_TOKEN_LATENCY = MetricSpec(
    "tokenline_inter_token_latency_seconds",
    Kind.HISTOGRAM,
    "Gap between consecutive text messages the ingress relays for one call (each message of a "
    "GenerateStream; may carry several tokens).",
    _MODEL,
    _SHORT,
)
E2E_REQUEST_LATENCY = MetricSpec(
    "tokenline_e2e_request_latency_seconds",
    Kind.HISTOGRAM,
    "From the ingress receiving a call to the last message of its finished request.",
    _MODEL,
    _LONG,
)
REQUEST_QUEUE_TIME = MetricSpec(
    "tokenline_request_queue_time_seconds",
    Kind.HISTOGRAM,
    "From acceptance (durably in Redis) to an engine replica claiming the request; first claim only.",
    _MODEL,
    _LONG,
)
TOKENIZE_TIME = MetricSpec(
    "tokenline_tokenize_time_seconds",
    Kind.HISTOGRAM,
    "From the ingress asking the tokenizer deployment for a prompt's ids (Generate, GenerateStream, "
    "Tokenize) to having them, its wait for a free call included: the Ray call's share of TTFT.",
    _MODEL,
    _SHORT,
)
NUM_REQUESTS_RUNNING = MetricSpec(
    "tokenline_num_requests_running", Kind.GAUGE, "Requests in an engine replica's running batch.", _MODEL
)
NUM_REQUESTS_WAITING = MetricSpec(
    "tokenline_num_requests_waiting",
    Kind.GAUGE,
    "Requests an engine replica holds that wait for KV blocks or a batch slot.",
    _MODEL,
)
KV_CACHE_USAGE = MetricSpec(
    "tokenline_kv_cache_usage_perc",
    Kind.GAUGE,
    "Share of an engine replica's KV-cache blocks in use, 0..1 (vLLM's name and meaning).",
    _MODEL,
)
QUEUE_DEPTH = MetricSpec(
    "tokenline_queue_depth",
    Kind.GAUGE,
    "Accepted, unfinished requests of the model in Redis (queued plus running): what admission "
    "bounds with max_queue_depth. Every engine replica of the model reports it: take max by model.",
    _MODEL,
)
PROMPT_TOKENS = MetricSpec(
    "tokenline_prompt_tokens_total", Kind.COUNTER, "Prompt tokens of accepted requests.", _MODEL_TENANT
)
GENERATION_TOKENS = MetricSpec(
    "tokenline_generation_tokens_total", Kind.COUNTER, "Tokens the engine replicas generated.", _MODEL
)
REQUEST_SUCCESS = MetricSpec(
    "tokenline_request_success_total",
    Kind.COUNTER,
    "Requests whose stream reached its end, by finish reason (stop, length, abort).",
    ("model", "tenant", "finished_reason"),
)
NUM_PREEMPTIONS = MetricSpec(
    "tokenline_num_preemptions_total",
    Kind.COUNTER,
    "Running requests an engine replica preempted for KV blocks (recomputed later).",
    _MODEL,
)
RPC_ERRORS = MetricSpec(
    "tokenline_rpc_errors_total",
    Kind.COUNTER,
    "RPCs the ingress ended with a non-OK gRPC status: refusals (INVALID_ARGUMENT, UNAUTHENTICATED, "
    "RESOURCE_EXHAUSTED, ...) and failures after acceptance (ABORTED, UNAVAILABLE).",
    ("rpc", "code"),
)

ALL_METRICS: tuple[MetricSpec, ...] = (
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    E2E_REQUEST_LATENCY,
    REQUEST_QUEUE_TIME,
    TOKENIZE_TIME,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    KV_CACHE_USAGE,
    QUEUE_DEPTH,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_SUCCESS,
    NUM_PREEMPTIONS,
    RPC_ERRORS,
)


def scrape_names() -> frozenset[str]:
    """Every series name a scrape of a node's metrics agent can show for tokenline."""
    return frozenset().union(*(spec.series_names for spec in ALL_METRICS))
