"""The default metrics port lies outside every port the gRPC edge may take, in each ingress mode."""

from __future__ import annotations

import typing

import pytest

from services.config import AppConfig
from services.server import DIRECT_INGRESS_PORTS, http_port, serve_environment

GRPC_PORT = 40000
INGRESS_MODES = typing.get_args(AppConfig.model_fields["grpc_ingress"].annotation)


def edge_ports(config: AppConfig) -> set[int]:
    """The gRPC port, the ingress replicas' range, HAProxy's listeners and Serve's HTTP port."""
    env = serve_environment(config)
    ports = {config.grpc_port, http_port(config)}
    if "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT" in env:
        first = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"])
        ports |= set(range(first, first + DIRECT_INGRESS_PORTS + 1))
        ports |= {int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]), int(env["RAY_SERVE_HAPROXY_STATS_PORT"])}
    return ports


@pytest.mark.parametrize("mode", INGRESS_MODES)
def test_default_metrics_port_is_not_an_edge_port(mode: str) -> None:
    config = AppConfig(grpc_port=GRPC_PORT, grpc_ingress=mode)
    assert config.metrics_port is None
    assert config.metrics_export_port not in edge_ports(config)
    assert config.metrics_export_port > GRPC_PORT


def test_metrics_port_past_the_last_port_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        AppConfig(grpc_port=65500)
    assert AppConfig(grpc_port=65500, metrics_port=9100).metrics_export_port == 9100
