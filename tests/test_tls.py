"""TLS on the client-facing gRPC port: a stack that serves with a certificate this test makes
(its own CA, the ``cryptography`` package) answers a client that trusts the CA, over the
library client and ``tokenline generate --ca``, and refuses a plaintext client and one that
does not trust the CA."""

from __future__ import annotations

import datetime
import io
import ipaddress
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from services.cli import main as tokenline_main
from services.client import TokenlineClient, channel_credentials
from services.config import AppConfig
from services.edge_config import TlsConfig
from services.errors import InvalidParameterError
from services.ingress.grpc_server import server_credentials
from services.proto.tokenline.v1 import generation_pb2 as pb
from tests.serving_stack import Stack, stack_config, start_stack

OWN_STACK = True


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing the server has


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_ca(directory: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_certificates(directory: Path) -> Certificates:
    ca_path, ca_cert, ca_key = _write_ca(directory, "test-ca")
    other_ca, _, _ = _write_ca(directory, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Certificates(ca=ca_path, cert=cert_path, key=key_path, other_ca=other_ca)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_stack(demo_model_dir: Path, certificates: Certificates) -> Iterator[Stack]:
    config = stack_config(str(demo_model_dir), engine_replicas=1)
    tls = TlsConfig(cert_file=str(certificates.cert), key_file=str(certificates.key))
    yield from start_stack(config.model_copy(update={"tls": tls}), channel_credentials(str(certificates.ca)))


def greedy(prompt: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(text=prompt)
    request.sampling.temperature = 0.0
    request.sampling.max_tokens = 12
    request.sampling.ignore_eos = True
    return request


def test_a_client_that_trusts_the_ca_streams_over_tls(tls_stack: Stack, certificates: Certificates) -> None:
    with TokenlineClient(tls_stack.target, tls_stack.api_key, channel_credentials(str(certificates.ca))) as c:
        messages = list(c.stream(greedy("the cat"), timeout_s=60))
    assert sum(len(m.token_ids) for m in messages) == 12
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(m.text for m in messages)


def test_health_answers_over_tls(tls_stack: Stack, certificates: Certificates) -> None:
    with grpc.secure_channel(tls_stack.target, channel_credentials(str(certificates.ca))) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plaintext_client_is_refused(tls_stack: Stack) -> None:
    client = TokenlineClient(tls_stack.target, tls_stack.api_key)
    with client, pytest.raises(grpc.RpcError) as caught:
        client.list_models()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_stack: Stack, certificates: Certificates) -> None:
    credentials = channel_credentials(str(certificates.other_ca))
    client = TokenlineClient(tls_stack.target, tls_stack.api_key, credentials)
    with client, pytest.raises(grpc.RpcError) as caught:
        client.list_models()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokenline_generate_with_ca(tls_stack: Stack, certificates: Certificates) -> None:
    args = ["generate", "the cat", "--target", tls_stack.target, "--api-key", tls_stack.api_key]
    args += ["--ca", str(certificates.ca), "--max-tokens", "5", "--temperature", "0"]
    out = io.StringIO()
    with redirect_stdout(out):
        code = tokenline_main(args)
    assert code == 0, out.getvalue()
    assert out.getvalue().strip() and not out.getvalue().startswith("error:")


def test_tls_with_a_serve_ingress_is_refused_naming_the_field(certificates: Certificates) -> None:
    tls = TlsConfig(cert_file=str(certificates.cert), key_file=str(certificates.key))
    with pytest.raises(ValidationError, match="tls: needs grpc_ingress 'replica'"):
        AppConfig(grpc_ingress="haproxy", tls=tls)


def test_unreadable_key_file_names_the_field(tmp_path: Path, certificates: Certificates) -> None:
    tls = TlsConfig(cert_file=str(certificates.cert), key_file=str(tmp_path / "missing.key"))
    with pytest.raises(InvalidParameterError) as caught:
        server_credentials(tls)
    assert caught.value.field == "tls.key_file"
