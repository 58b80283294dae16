"""grpc.health.v1 and server reflection on the port clients dial (the shared stack, with
grpc_ingress 'replica': the ingress replica serves both next to tokenline.v1.Generation), as
Kubernetes gRPC probes and ``grpcurl`` use them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.ingress.registration import HEALTH_SERVICE, SERVICE_NAME
from tests.serving_stack import Stack

REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture(scope="module")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.target) as c:
        yield c


def test_stack_serves_through_the_ingress_replicas_own_server(stack: Stack) -> None:
    assert stack.config.grpc_ingress == "replica", "these tests are about the default ingress mode"


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_check_says_serving_for_the_server_and_the_generation_service(
    channel: grpc.Channel, service: str
) -> None:
    """No API key: probes carry none, and health says nothing about any tenant's data."""
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_check_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tokenline.v1.Nothing"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tokenline.v1.Nothing" in (caught.value.details() or "")


def test_watch_sends_the_current_status_first(channel: grpc.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
    )
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()


def reflect(channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return response


def test_reflection_lists_every_service_on_the_port(channel: grpc.Channel) -> None:
    response = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in response.list_services_response.service}
    assert names == {SERVICE_NAME, HEALTH_SERVICE, REFLECTION_SERVICE}


def test_reflection_describes_the_generation_service_as_served(channel: grpc.Channel) -> None:
    """What grpcurl needs to build a call: the file that defines the service, with its RPCs."""
    response = reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    services = {f"{f.package}.{s.name}": s for f in files for s in f.service}
    methods = {m.name: (m.input_type, m.server_streaming) for m in services[SERVICE_NAME].method}
    assert methods["GenerateStream"] == (".tokenline.v1.GenerateRequest", True)
    assert methods["Resume"][1] is True
    assert {"Generate", "Tokenize", "Cancel", "ListModels"} <= set(methods)
