"""Typed errors -> gRPC status codes, set on the call's context; request bytes parsed under that rule.

Ray Serve's gRPC servers keep a status code that the deployment set on its context
before raising, and our own server turns ``RpcError`` into that status, so every
refusal goes through ``RpcError`` here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from services.errors import (
    InvalidParameterError,
    ModelNotFoundError,
    QueueFullError,
    QueueUnavailableError,
    RequestNotFoundError,
    TokenlineError,
    short_repr,
)
from services.ingress import convert
from services.ingress.auth import AuthenticationError, PermissionDeniedError
from services.ingress.ratelimit import RateLimitedError


class CallContext(Protocol):
    """What the ingress uses of a call's context: Ray Serve's ``RayServegRPCContext`` and
    ``grpc.aio.ServicerContext`` both provide it."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def invocation_metadata(self) -> Any: ...


class RpcError(Exception):
    """Ends an RPC with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")

    def __reduce__(self) -> tuple[type[RpcError], tuple[grpc.StatusCode, str]]:
        return (RpcError, (self.code, self.details))


def rpc_error_for(error: TokenlineError) -> RpcError:
    if isinstance(error, InvalidParameterError):
        return RpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{error.field}: {error.reason} (got {short_repr(error.value)})"
        )
    if isinstance(error, (ModelNotFoundError, RequestNotFoundError)):
        return RpcError(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, AuthenticationError):
        return RpcError(grpc.StatusCode.UNAUTHENTICATED, str(error))
    if isinstance(error, PermissionDeniedError):
        return RpcError(grpc.StatusCode.PERMISSION_DENIED, str(error))
    if isinstance(error, (QueueFullError, RateLimitedError)):
        retry_ms = round(error.retry_after_s * 1000)
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error}; retry-after-ms={retry_ms}")
    if isinstance(error, QueueUnavailableError):
        retry_ms = round(error.retry_after_s * 1000)
        return RpcError(grpc.StatusCode.UNAVAILABLE, f"{error}; retry-after-ms={retry_ms}")
    return RpcError(grpc.StatusCode.INTERNAL, str(error))


def abort(context: CallContext, error: RpcError) -> RpcError:
    """Record the status on the context and hand back the error for the caller to raise."""
    context.set_code(error.code)
    context.set_details(error.details)
    return error


@contextlib.contextmanager
def status_on_error(grpc_context: CallContext) -> Iterator[None]:
    """Turn a typed error into the RPC's status code (INVALID_ARGUMENT, NOT_FOUND, ...)."""
    try:
        yield
    except TokenlineError as error:
        raise abort(grpc_context, rpc_error_for(error)) from error


_Message = TypeVar("_Message", bound=Message)


def parse_request(message_type: type[_Message], raw: bytes, grpc_context: CallContext) -> _Message:
    """The request's bytes as ``message_type``; corrupt bytes become INVALID_ARGUMENT."""
    with status_on_error(grpc_context):
        return convert.parse_message(message_type, raw)
