"""Typed errors. Each carries the field and the value that caused it so that the
gRPC edge can map it to a status code that names the field."""

from __future__ import annotations

from typing import Any


class TokenlineError(Exception):
    """Base class of every error tokenline raises on purpose.

    Subclasses keep their constructor arguments so that an error survives pickling
    (Ray carries errors between processes) with its typed fields intact.
    """

    _init_args: tuple[Any, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.__class__, self._init_args)


class InvalidParameterError(TokenlineError, ValueError):
    """A request or configuration field holds a value that is not allowed."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self._init_args = (field, value, reason)
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={short_repr(value)}: {reason}")


class UnsupportedModelError(TokenlineError):
    """The checkpoint's architecture has no forward code in tokenline."""

    def __init__(self, architecture: str, supported: tuple[str, ...]) -> None:
        self._init_args = (architecture, supported)
        self.architecture = architecture
        self.supported = supported
        super().__init__(f"architecture {architecture!r} is not supported; supported: {', '.join(supported)}")


class ModelNotFoundError(TokenlineError):
    """No model of that name is served here."""

    def __init__(self, model: str) -> None:
        self._init_args = (model,)
        self.model = model
        super().__init__(f"model {short_repr(model)} is not served here")


class RequestNotFoundError(TokenlineError):
    """No accepted request has this id (or it was forgotten after its retention)."""

    def __init__(self, request_id: str) -> None:
        self._init_args = (request_id,)
        self.request_id = request_id
        super().__init__(f"request_id: no request {short_repr(request_id)} is known")


class QueueFullError(TokenlineError):
    """Admission refused: the model's queue is at its bound."""

    def __init__(self, model: str, depth: int, limit: int, retry_after_s: float) -> None:
        self._init_args = (model, depth, limit, retry_after_s)
        self.model = model
        self.depth = depth
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(
            f"queue for model {model!r} is full ({depth}/{limit}); retry after {retry_after_s:.1f}s"
        )


class QueueUnavailableError(TokenlineError):
    """Redis, which holds the queue, cannot be reached. Nothing accepted is lost; the caller
    may retry after ``retry_after_s`` (a repeated request id is never run twice)."""

    def __init__(self, operation: str, cause: str, retry_after_s: float) -> None:
        self._init_args = (operation, cause, retry_after_s)
        self.operation = operation
        self.cause = cause
        self.retry_after_s = retry_after_s
        super().__init__(
            f"request queue unavailable during {operation} ({cause}); retry after {retry_after_s:.1f}s"
        )


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters: error texts are logged and a value may be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
