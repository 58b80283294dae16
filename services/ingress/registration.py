"""How the Generation service is registered with Ray Serve's gRPC proxy.

The generated ``add_GenerationServicer_to_server`` makes the proxy parse each request
before tokenline sees it, so a message with invalid UTF-8 in a string field comes back
as UNKNOWN. Registered here without a request deserializer, the proxy forwards the raw
bytes (it only replaces response serializers) and the ingress parses them itself,
answering INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.proto.tokenline.v1 import generation_pb2 as pb

SERVICE_NAME = "tokenline.v1.Generation"


def add_generation_servicer(servicer: Any, server: Any) -> None:
    """Ray Serve's ``grpc_servicer_functions`` entry (see ``services.app.GRPC_SERVICER_FUNCTION``)."""
    unary, streaming = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    handlers = {
        "Generate": unary(servicer.Generate, response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": streaming(
            servicer.GenerateStream, response_serializer=pb.GenerateStreamResponse.SerializeToString
        ),
        "Tokenize": unary(servicer.Tokenize, response_serializer=pb.TokenizeResponse.SerializeToString),
        "Cancel": unary(servicer.Cancel, response_serializer=pb.CancelResponse.SerializeToString),
        "ListModels": unary(servicer.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString),
        "Resume": streaming(servicer.Resume, response_serializer=pb.GenerateStreamResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
