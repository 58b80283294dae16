"""Counting the RPCs that end with a non-OK status, by RPC and code.

Every non-OK ending of an ingress RPC is an ``RpcError`` raised out of the RPC method (see
``status.abort``), so one wrapper per method sees them all: the refusals before acceptance
and the failures after it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar

from services.ingress.status import CallContext, RpcError
from services.metrics.ingress import IngressMetrics


class HasMetrics(Protocol):
    @property
    def metrics(self) -> IngressMetrics: ...


_Self = TypeVar("_Self", bound=HasMetrics)
_Response = TypeVar("_Response")

UnaryMethod = Callable[[_Self, bytes, CallContext], Awaitable[_Response]]
StreamMethod = Callable[[_Self, bytes, CallContext], AsyncGenerator[_Response, None]]


def counted_unary(method: UnaryMethod[_Self, _Response]) -> UnaryMethod[_Self, _Response]:
    @functools.wraps(method)
    async def counted(self: _Self, raw: bytes, grpc_context: CallContext) -> _Response:
        try:
            return await method(self, raw, grpc_context)
        except RpcError as error:
            self.metrics.rpc_error(method.__name__, error.code.name)
            raise

    return counted


def counted_stream(method: StreamMethod[_Self, _Response]) -> StreamMethod[_Self, _Response]:
    @functools.wraps(method)
    async def counted(self: _Self, raw: bytes, grpc_context: CallContext) -> AsyncGenerator[_Response, None]:
        try:
            # Closed with this wrapper, not whenever it is collected: the method's cleanup (it
            # cancels an abandoned request) runs when the client goes away.
            async with contextlib.aclosing(method(self, raw, grpc_context)) as responses:
                async for response in responses:
                    yield response
        except RpcError as error:
            self.metrics.rpc_error(method.__name__, error.code.name)
            raise

    return counted
