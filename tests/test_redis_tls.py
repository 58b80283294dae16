"""Redis over TLS with a password: Debian's redis-server 7 (``make redis-tls``) serving TLS only,
``requirepass`` set, and the whole stack configured as ``tokenline serve --redis-url
'rediss://default:${PASSWORD}@HOST:PORT/0?ssl_ca_certs=CA'`` streams a request end to end (the
ingress with its API keys and rate limits, the engine and the detokenizer all reach Redis through
that URL only: the server has no plaintext port).
A plaintext client, one without the password and one with a wrong password are refused."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import yaml

from services.cli_serving import add_serving_commands, app_config_from_args
from services.client import TokenlineClient
from services.config import AppConfig
from services.errors import InvalidParameterError
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.queue import RedisServer
from services.queue.redis_server import LOOPBACK
from tests.debian_redis import debian_tls_redis
from tests.serving_stack import Stack, stack_config, start_stack
from tests.stack_probes import wait_until
from tests.test_tls import Certificates, make_certificates

OWN_STACK = True
PASSWORD_VARIABLE = "TOKENLINE_TEST_REDIS_PASSWORD"
# Characters a URL must quote, and a quote and a backslash that the config file must escape.
AWKWARD_PASSWORD = 'p@ss:w/rd%?#"\\ x'


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture(scope="module")
def password() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def tls_redis(certificates: Certificates, password: str) -> Iterator[RedisServer]:
    with debian_tls_redis(certificates, password) as server:
        yield server


def url_with_reference(server: RedisServer, ca: Path) -> str:
    """The server's URL as an operator writes it: the password as a ``${NAME}`` reference."""
    return f"rediss://default:${{{PASSWORD_VARIABLE}}}@{LOOPBACK}:{server.port}/0?ssl_ca_certs={ca}"


def serve_config(*argv: str) -> AppConfig:
    """The AppConfig that ``tokenline serve ARGV`` would run."""
    parser = argparse.ArgumentParser()
    add_serving_commands(parser.add_subparsers())
    return app_config_from_args(parser.parse_args(["serve", *argv]))


@pytest.fixture(scope="module")
def tls_stack(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, tls_redis: RedisServer,
    certificates: Certificates, password: str,
) -> Iterator[Stack]:  # fmt: skip
    config_file = tmp_path_factory.mktemp("config") / "app.yaml"
    base = stack_config(str(demo_model_dir), engine_replicas=1)
    config_file.write_text(yaml.safe_dump(base.model_dump(mode="json")))
    config = serve_config(
        "--config", str(config_file), "--redis-url", url_with_reference(tls_redis, certificates.ca)
    )
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv(PASSWORD_VARIABLE, password)
        yield from start_stack(config, redis_server=tls_redis)


def test_the_server_has_no_plaintext_listener(tls_redis: RedisServer) -> None:
    with redis.Redis.from_url(tls_redis.url) as client:
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("tls-port") == {"tls-port": str(tls_redis.port)}


def test_a_plaintext_client_is_refused(tls_redis: RedisServer, password: str) -> None:
    url = f"redis://default:{password}@{LOOPBACK}:{tls_redis.port}/0"
    with redis.Redis.from_url(url, socket_timeout=5) as client, pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_wrong_password_is_refused(tls_redis: RedisServer, password: str) -> None:
    wrong = tls_redis.url.replace(f":{password}@", ":not-the-password@")
    assert wrong != tls_redis.url
    with redis.Redis.from_url(wrong) as client, pytest.raises(redis.AuthenticationError):
        client.ping()


def test_no_password_is_refused(tls_redis: RedisServer, password: str) -> None:
    anonymous = tls_redis.url.replace(f"default:{password}@", "")
    with redis.Redis.from_url(anonymous) as client, pytest.raises(redis.AuthenticationError):
        client.ping()


def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_redis: RedisServer, certificates: Certificates
) -> None:
    untrusting = tls_redis.url.replace(quote(str(certificates.ca)), quote(str(certificates.other_ca)))
    assert untrusting != tls_redis.url
    with redis.Redis.from_url(untrusting) as client, pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_password_with_url_and_config_syntax_in_it_works() -> None:
    with RedisServer(password=AWKWARD_PASSWORD) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert client.acl_whoami() == "default"
        with (
            redis.Redis(host=LOOPBACK, port=server.port) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()


def test_the_plaintext_default_url_is_unchanged() -> None:
    with RedisServer() as server:
        assert server.url == f"redis://{LOOPBACK}:{server.port}/0"


def test_serve_redis_url_expands_the_password_reference(
    tls_redis: RedisServer, certificates: Certificates, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = serve_config("--redis-url", url_with_reference(tls_redis, certificates.ca))
    assert "${" + PASSWORD_VARIABLE + "}" in config.redis_url  # kept as written until the app is built
    monkeypatch.setenv(PASSWORD_VARIABLE, password)
    assert config.with_environment().redis_url == tls_redis.url
    monkeypatch.delenv(PASSWORD_VARIABLE)
    with pytest.raises(InvalidParameterError) as caught:
        config.with_environment()
    assert caught.value.field == "redis_url"


def test_a_request_streams_end_to_end_through_the_tls_redis(tls_stack: Stack, tls_redis: RedisServer) -> None:
    request = pb.GenerateRequest(text="the cat")
    request.sampling.temperature = 0.0
    request.sampling.max_tokens = 12
    request.sampling.ignore_eos = True
    with TokenlineClient(tls_stack.target, tls_stack.api_key) as client:
        messages = list(client.stream(request, timeout_s=60))
    assert sum(len(m.token_ids) for m in messages) == 12
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(m.text for m in messages)
    with redis.Redis.from_url(tls_redis.url) as client:
        prefix = tls_stack.config.queue.key_prefix
        assert any(client.scan_iter(match=f"{prefix}:*"))  # the queue and the keys live here
        assert client.config_get("port") == {"port": "0"}  # so all of it went over TLS
    wait_until(lambda: tls_stack.unfinished_in_queue() == (0, 0), 10, "the request to be acknowledged")


def test_the_password_is_on_no_command_line(tls_stack: Stack, password: str) -> None:
    """Not Redis's (its config file holds it) nor a Ray worker's (they get it as an argument)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert password.encode() not in cmdline.read_bytes(), cmdline
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended meanwhile, or is not ours to read
