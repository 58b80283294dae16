"""Names of every Redis key the queue owns.

Layout (prefix ``tl``):

- ``tl:{model}:requests``    request stream of priority 0; consumer group ``engines``
- ``tl:{model}:requests.p{N}`` request stream of priority N != 0 (one band per priority value,
  ``MIN_PRIORITY..MAX_PRIORITY``); consumer group ``engines``
- ``tl:{model}:ready``       sorted set of the priorities whose stream may hold undelivered entries
- ``tl:{model}:doorbell``    one-entry stream that every enqueue rewrites: idle engines block on it
- ``tl:{model}:active``      hash request_id -> ticket of accepted-but-unfinished requests (admission)
- ``tl:{model}:cancelled``   set of request ids a client cancelled while they were active
- ``tl:{model}:dead``        dead-letter stream
- ``tl:out:{request_id}``    output stream of one request
- ``tl:idem:{request_id}``   idempotency marker of one request id
- ``tl:meta:{request_id}``   what a reader needs to follow or resume the request's stream
- ``tl:text:{request_id}``   text stream of one request (detokenizer -> ingress)
- ``tl:detok:assign``        one entry per accepted request; consumer group ``detokenizers``:
                             the detokenizer replica that holds an entry owns that request's text
- ``tl:wake:{replica}``      an ingress replica's wake-up stream (new open calls join its read)

A *ticket* names one request entry across all bands: ``{priority}/{stream id}``, or the bare
stream id for priority 0. Priority 0 keeps the key and the id form that the queue had before it
had bands, so entries accepted before an upgrade are still found and released by new engines.

Per-model suffixes contain no ``:``, so two models can never share a key. Only a
model whose first segment is a shared namespace (``out``, ``idem``) could collide
with per-request keys, and such names are refused.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from dataclasses import dataclass

from services.errors import InvalidParameterError
from services.messages import MAX_PRIORITY, MIN_PRIORITY

ENGINE_GROUP = "engines"
DETOKENIZER_GROUP = "detokenizers"
TOKENIZER_GROUP = "tokenizers"
_SHARED_NAMESPACES = frozenset(
    {"out", "idem", "meta", "auth", "ratelimit", "text", "detok", "wake", "registry", "tokenize"}
)
MAX_NAME_CHARS = 512
PRIORITIES = tuple(range(MIN_PRIORITY, MAX_PRIORITY + 1))  # band order: served first to last


@dataclass(frozen=True)
class ModelKeys:
    requests: str  # the priority-0 band
    ready: str
    doorbell: str
    active: str
    cancelled: str
    dead: str

    @functools.cached_property
    def bands(self) -> tuple[str, ...]:
        """Every band's stream, most urgent first (index i holds priority ``PRIORITIES[i]``)."""
        return tuple(self.band(priority) for priority in PRIORITIES)

    def band(self, priority: int) -> str:
        check_priority(priority)
        return self.requests if priority == 0 else f"{self.requests}.p{priority}"


# Bounded: the ingress looks up names clients send, and unknown ones must not pile up.
@functools.lru_cache(maxsize=256)
def _model_keys(prefix: str, model: str) -> ModelKeys:
    base = f"{prefix}:{model}"
    return ModelKeys(
        requests=f"{base}:requests",
        ready=f"{base}:ready",
        doorbell=f"{base}:doorbell",
        active=f"{base}:active",
        cancelled=f"{base}:cancelled",
        dead=f"{base}:dead",
    )


@dataclass(frozen=True)
class QueueKeys:
    prefix: str = "tl"

    def for_model(self, model: str) -> ModelKeys:
        _check_model(model)
        # An engine asks on every step (its write, its claim): built once per prefix and model.
        return _model_keys(self.prefix, model)

    def output(self, request_id: str) -> str:
        check_request_id(request_id)
        return f"{self.output_prefix}{request_id}"

    @property
    def output_prefix(self) -> str:
        return f"{self.prefix}:out:"

    @property
    def text_prefix(self) -> str:
        return f"{self.prefix}:text:"

    def idempotency(self, request_id: str) -> str:
        check_request_id(request_id)
        return f"{self.prefix}:idem:{request_id}"

    def stream_metadata(self, request_id: str) -> str:
        check_request_id(request_id)
        return f"{self.prefix}:meta:{request_id}"

    def text(self, request_id: str) -> str:
        check_request_id(request_id)
        return f"{self.text_prefix}{request_id}"

    @property
    def detokenizer_assignments(self) -> str:
        return f"{self.prefix}:detok:assign"

    @property
    def tokenize_calls(self) -> str:
        return f"{self.prefix}:tokenize:calls"

    def tokenize_replies(self, replica: str) -> str:
        check_request_id(replica)
        return f"{self.prefix}:tokenize:replies:{replica}"

    def wake(self, replica: str) -> str:
        check_request_id(replica)
        return f"{self.prefix}:wake:{replica}"


def split_ticket(ticket: str) -> tuple[int, str] | None:
    """(priority, stream id) of a ticket, or None when it is not one (then nothing holds it)."""
    priority, slash, stream_id = ticket.rpartition("/")
    if not slash:
        return 0, ticket
    try:
        value = int(priority)
    except ValueError:
        return None
    return (value, stream_id) if MIN_PRIORITY <= value <= MAX_PRIORITY and value != 0 else None


def check_priority(priority: int) -> None:
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        reason = f"must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}]"
        raise InvalidParameterError("priority", priority, reason)


def consumer_name() -> str:
    """A replica's name in a consumer group: host and process, plus a random part, so that two
    replicas in one process (as in tests) stay apart and a restarted one is a new consumer."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_request_id(request_id: str) -> None:
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_NAME_CHARS:
        # The length, not the id: error texts are logged, and the id may be megabytes.
        length = len(request_id) if isinstance(request_id, str) else request_id
        raise InvalidParameterError("request_id", length, f"must be 1..{MAX_NAME_CHARS} characters")
    if not request_id.isprintable():
        raise InvalidParameterError("request_id", request_id, "must not contain control characters")


def _check_model(model: str) -> None:
    if not isinstance(model, str) or not model or len(model) > MAX_NAME_CHARS:
        length = len(model) if isinstance(model, str) else model
        raise InvalidParameterError("model", length, f"must be 1..{MAX_NAME_CHARS} characters")
    if not model.isprintable():
        raise InvalidParameterError("model", model, "must not contain control characters")
    if model.split(":", 1)[0] in _SHARED_NAMESPACES:
        raise InvalidParameterError(
            "model", model, f"must not start with a reserved key namespace {sorted(_SHARED_NAMESPACES)}"
        )
