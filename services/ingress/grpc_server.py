"""The ingress replica's own gRPC server (``grpc_ingress: replica``).

Each ingress replica serves ``tokenline.v1.Generation`` itself on ``grpc_port``, on the
event loop its calls already run on, so a streamed message costs one protobuf write and
no hop to another thread, actor or proxy. The socket is opened with SO_REUSEPORT: the
ingress replicas of one node share the port and the kernel spreads connections over
them; a replacement replica binds the same port, so the address clients dial never moves.

Next to the Generation service it serves ``grpc.health.v1.Health`` (``ingress.health``,
for Kubernetes gRPC probes) and server reflection (for ``grpcurl``), and TLS when a
certificate is configured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection
from ray import serve
from ray.serve.schema import ApplicationStatus

from services.edge_config import GrpcServerSettings, TlsConfig
from services.errors import InvalidParameterError
from services.ingress.handover import wait_for_another_listener
from services.ingress.registration import HEALTH_SERVICE, SERVICE_NAME, generation_handlers, health_handlers
from services.ingress.status import RpcError

logger = logging.getLogger(__name__)

# Serve kills a stopping replica drain_s after asking it to stop; the server's own stop and
# the reader's close need this much of it.
STOP_MARGIN_S = 2.0
STATUS_TIMEOUT_S = 5.0  # asking Serve whether the application is being deleted
_Unary = Callable[[bytes, Any], Awaitable[Any]]
_Streaming = Callable[[bytes, Any], AsyncIterator[Any]]


class IngressBindError(RuntimeError):
    """The gRPC port could not be bound (taken by a process that does not share it)."""


class _AccessLog:
    """One line per call in the replica's log (Serve writes such a line for the calls it
    serves): RPC, status, duration; a refusal's details name the field, never its text."""

    def __init__(self, rpc: str) -> None:
        self._rpc = rpc
        self._started = time.monotonic()

    def _ms(self) -> float:
        return round((time.monotonic() - self._started) * 1000, 1)

    def ok(self) -> None:
        logger.info("CALL %s OK %.1fms", self._rpc, self._ms())

    def refused(self, error: RpcError) -> None:
        logger.warning("CALL %s %s %.1fms: %s", self._rpc, error.code.name, self._ms(), error.details)

    def ended_early(self) -> None:
        logger.info("CALL %s CANCELLED %.1fms", self._rpc, self._ms())


def _unary(method: _Unary) -> _Unary:
    """A grpc.aio handler that ends the call with the status an ``RpcError`` carries
    (grpc.aio turns any other exception into UNKNOWN)."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        log = _AccessLog(method.__name__)
        try:
            response = await method(raw, context)
        except RpcError as error:
            log.refused(error)
            await context.abort(error.code, error.details)
        except asyncio.CancelledError:
            log.ended_early()
            raise
        log.ok()
        return response

    return handle


def _streaming(method: _Streaming) -> _Streaming:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        log = _AccessLog(method.__name__)
        try:
            async for message in method(raw, context):
                yield message
        except RpcError as error:
            log.refused(error)
            await context.abort(error.code, error.details)
        except (asyncio.CancelledError, GeneratorExit):
            log.ended_early()
            raise
        log.ok()

    return handle


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """PEM files -> credentials; a missing or unreadable file is an error naming its field."""

    def read(field: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise InvalidParameterError(f"tls.{field}", path, f"cannot be read ({error.strerror})") from error

    chain = [(read("key_file", tls.key_file), read("cert_file", tls.cert_file))]
    if not tls.client_ca_file:
        return grpc.ssl_server_credentials(chain)
    return grpc.ssl_server_credentials(
        chain, root_certificates=read("client_ca_file", tls.client_ca_file), require_client_auth=True
    )


async def application_stays() -> bool:
    """Whether another ingress replica will follow this stopping one: not when Serve is
    deleting the application (or cannot say within a few seconds)."""
    try:
        name = serve.get_replica_context().app_name
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
        return bool(status.applications[name].status != ApplicationStatus.DELETING)
    except Exception:
        logger.warning("no application status; stopping without a handover", exc_info=True)
        return False


class IngressGrpcServer:
    """One replica's listener: Generation + Health + reflection on the shared port; ``servicer``
    has the methods of both services (``IngressService``)."""

    def __init__(self, servicer: Any, settings: GrpcServerSettings) -> None:
        self._settings = settings
        size = settings.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
            ]
        )
        self._server.add_generic_rpc_handlers(
            (
                generation_handlers(servicer, unary=_unary, streaming=_streaming),
                health_handlers(servicer, unary=_unary, streaming=_streaming),
            )
        )
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server
        )
        address = f"[::]:{settings.port}"
        try:
            if settings.tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, server_credentials(settings.tls))
        except RuntimeError as error:
            raise IngressBindError(f"cannot listen on {address}: {error}") from error
        if self.port == 0:
            raise IngressBindError(f"cannot listen on {address}")

    async def start(self) -> None:
        await self._server.start()
        logger.info(
            "ingress gRPC server listening", extra={"port": self.port, "tls": self._settings.tls is not None}
        )

    async def stop(self, hand_over: bool) -> None:
        """Refuse new calls, give open streams the rest of the drain time to finish, then
        cancel what is left; those clients Resume. With ``hand_over`` it first keeps accepting
        until another replica listens on the port (at most half the drain time), so that a
        rolling update refuses no connection. (The caller says NOT_SERVING first.)"""
        started = time.monotonic()
        if hand_over:
            await wait_for_another_listener(self.port, self._settings.drain_s / 2)
        remaining = self._settings.drain_s - STOP_MARGIN_S - (time.monotonic() - started)
        await self._server.stop(max(0.0, remaining))
