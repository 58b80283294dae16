"""The method tables of the Generation and Health services, for Ray Serve's gRPC servers
and for our own.

The generated ``add_GenerationServicer_to_server`` makes the server parse each request
before tokenline sees it, so a message with invalid UTF-8 in a string field comes back
as UNKNOWN. Registered here without a request deserializer, the server hands over the
raw bytes (only responses are serialized) and the ingress parses them itself,
answering INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from services.proto.tokenline.v1 import generation_pb2 as pb

SERVICE_NAME = "tokenline.v1.Generation"
HEALTH_SERVICE = "grpc.health.v1.Health"

_Wrap = Callable[[Any], Any]


def _as_is(method: Any) -> Any:
    return method


def generation_handlers(
    servicer: Any, unary: _Wrap = _as_is, streaming: _Wrap = _as_is
) -> grpc.GenericRpcHandler:
    """Generation's handlers over ``servicer``'s methods, each passed through ``unary`` or
    ``streaming`` first (our own server turns typed errors into statuses there)."""
    unary_rpc, streaming_rpc = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    handlers = {
        "Generate": unary_rpc(
            unary(servicer.Generate), response_serializer=pb.GenerateResponse.SerializeToString
        ),
        "GenerateStream": streaming_rpc(
            streaming(servicer.GenerateStream),
            response_serializer=pb.GenerateStreamResponse.SerializeToString,
        ),
        "Tokenize": unary_rpc(
            unary(servicer.Tokenize), response_serializer=pb.TokenizeResponse.SerializeToString
        ),
        "Cancel": unary_rpc(unary(servicer.Cancel), response_serializer=pb.CancelResponse.SerializeToString),
        "ListModels": unary_rpc(
            unary(servicer.ListModels), response_serializer=pb.ListModelsResponse.SerializeToString
        ),
        "Resume": streaming_rpc(
            streaming(servicer.Resume), response_serializer=pb.GenerateStreamResponse.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def health_handlers(
    servicer: Any, unary: _Wrap = _as_is, streaming: _Wrap = _as_is
) -> grpc.GenericRpcHandler:
    """``grpc.health.v1.Health`` over ``servicer.Check`` and ``servicer.Watch`` (see
    ``ingress.health``); requests are parsed here, health probes send no user data."""
    request = health_pb2.HealthCheckRequest.FromString
    response = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            unary(servicer.Check), request_deserializer=request, response_serializer=response
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            streaming(servicer.Watch), request_deserializer=request, response_serializer=response
        ),
    }
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers)


def add_generation_servicer(servicer: Any, server: Any) -> None:
    """Ray Serve's ``grpc_servicer_functions`` entry (see ``services.app.GRPC_SERVICER_FUNCTIONS``)."""
    server.add_generic_rpc_handlers((generation_handlers(servicer),))


def add_health_servicer(servicer: Any, server: Any) -> None:
    """Ray Serve's ``grpc_servicer_functions`` entry for the health service."""
    server.add_generic_rpc_handlers((health_handlers(servicer),))
