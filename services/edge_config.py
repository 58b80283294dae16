"""Settings of the client-facing gRPC edge: TLS and the ingress replica's own server."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# How calls reach the ingress replicas (AppConfig.grpc_ingress says what each one is).
GrpcIngress = Literal["replica", "haproxy", "direct", "proxy"]
GRPC_INGRESS_MODES: tuple[str, ...] = get_args(GrpcIngress)


class TlsConfig(BaseModel):
    """TLS on the client-facing gRPC port (PEM files, e.g. mounted from a Kubernetes Secret)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: str = Field(min_length=1, description="Server certificate chain (PEM).")
    key_file: str = Field(min_length=1, description="Private key of the certificate (PEM).")
    client_ca_file: str = Field(
        default="",
        description="CA (PEM) that client certificates must chain to; '' = clients need no certificate.",
    )


class GrpcServerSettings(BaseModel):
    """What an ingress replica needs to run its own gRPC server (``grpc_ingress: replica``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(ge=0, le=65535, description="Port every ingress replica of a node shares.")
    max_message_bytes: int = Field(ge=1024, description="Largest gRPC message received or sent.")
    drain_s: float = Field(gt=0.0, description="How long a stopping replica lets open streams finish.")
    tls: TlsConfig | None = Field(default=None, description="TLS on the port; None = plaintext.")
