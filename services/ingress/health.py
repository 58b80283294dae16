"""``grpc.health.v1.Health`` for the ingress: one implementation for every ``grpc_ingress``.

The methods follow the ingress's calling convention (a parsed request and the call's
context; ``Watch`` an async generator), so Ray Serve's gRPC servers route to them by
method name like the Generation RPCs, and our own server registers the same methods.
A replica says SERVING for the server as a whole (service "") and for
``tokenline.v1.Generation`` until it starts to drain, NOT_SERVING from then on, so
probes and balancers stop sending it new calls while its open streams finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from services.ingress.registration import SERVICE_NAME
from services.ingress.status import CallContext, RpcError, abort

OVERALL = ""  # the health protocol's name for the server as a whole
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class IngressHealth:
    def __init__(self) -> None:
        self._serving = True
        self._changed = asyncio.Event()  # set and replaced on every change, to wake watchers

    def set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            self._changed.set()
            self._changed = asyncio.Event()

    def _status(self, service: str, context: CallContext) -> int:
        if service not in (OVERALL, SERVICE_NAME):
            raise abort(context, RpcError(grpc.StatusCode.NOT_FOUND, f"service: unknown service {service!r}"))
        return int(SERVING if self._serving else NOT_SERVING)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: CallContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self._status(request.service, context))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: CallContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status, then every change; ends once the replica no longer serves,
        so that an open watch never holds up a drain."""
        while True:
            changed = self._changed
            status = self._status(request.service, context)
            yield health_pb2.HealthCheckResponse(status=status)
            if status == NOT_SERVING:
                return
            await changed.wait()
