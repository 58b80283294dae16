"""API keys against a real redis-server: store, authenticate, revoke, CLI."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from services.cli_keys import main as keys_main
from services.errors import InvalidParameterError
from services.ingress.api_keys import ApiKeyStore, Tenant, hash_key
from services.ingress.auth import AuthenticationError, Authenticator, PermissionDeniedError, bearer_key

T = TypeVar("T")


def run_with(url: str, body: Callable[[Authenticator], Awaitable[T]], cache_ttl_s: float = 2.0) -> T:
    async def main() -> T:
        async with Authenticator(url, cache_ttl_s=cache_ttl_s) as auth:
            return await body(auth)

    return asyncio.run(main())


def bearer(key: str) -> list[tuple[str, str]]:
    return [("x-request-id", "r1"), ("authorization", f"Bearer {key}")]


def authenticate(url: str, metadata: Sequence[tuple[str, str]], model: str | None = "demo") -> Tenant:
    return run_with(url, lambda auth: auth.authenticate(metadata, model))


def everything_in_redis(url: str) -> list[bytes]:
    """Every key name and every stored value, as raw bytes."""
    found: list[bytes] = []
    with redis.Redis.from_url(url) as client:
        for name in client.scan_iter():
            found.append(name)
            kind = client.type(name)
            if kind == b"hash":
                for field, value in client.hgetall(name).items():
                    found += [field, value]
            elif kind == b"string":
                found.append(client.get(name))
            else:
                pytest.fail(f"unexpected key type {kind!r}")
    return found


def test_create_list_revoke_round_trip_never_stores_the_key(redis_url: str) -> None:
    with ApiKeyStore(redis_url) as store:
        key, record = store.create("acme", ["demo", "other"], rpm=5, tpm=1000)
        key2, record2 = store.create("beta")
        assert key.startswith("tl_") and len(key) == 46
        assert record.key_id == hash_key(key)[:12]
        assert (record.tenant, record.models) == ("acme", ("demo", "other"))
        assert (record.requests_per_minute, record.tokens_per_minute) == (5, 1000)
        assert abs(record.created_at - time.time()) < 60
        assert store.list() == [record, record2]

        stored = everything_in_redis(redis_url)
        assert stored, "the store wrote nothing"
        for secret in (key, key2):
            random_part = secret[3:].encode()
            assert not any(random_part in item for item in stored)

        assert store.revoke(record.key_id) is True
        assert store.revoke(record.key_id) is False
        assert store.list() == [record2]
        with pytest.raises(InvalidParameterError) as error:
            store.revoke("not-an-id")
        assert error.value.field == "key_id"


@pytest.mark.parametrize(
    ("tenant", "models", "rpm", "tpm", "field"),
    [
        ("", (), 0, 0, "tenant"),
        ("a:b", (), 0, 0, "tenant"),
        ("acme", ("ok", "bad model"), 0, 0, "models"),
        ("acme", (), -1, 0, "requests_per_minute"),
        ("acme", (), 0, 1.5, "tokens_per_minute"),
    ],
)
def test_create_refuses_bad_fields(
    redis_url: str, tenant: str, models: tuple[str, ...], rpm: int, tpm: int, field: str
) -> None:
    with ApiKeyStore(redis_url) as store, pytest.raises(InvalidParameterError) as error:
        store.create(tenant, models, rpm, tpm)
    assert error.value.field == field
    with ApiKeyStore(redis_url) as store:
        assert store.list() == []


def test_authenticate_ok(redis_url: str) -> None:
    with ApiKeyStore(redis_url) as store:
        key, record = store.create("acme", ["demo"], rpm=7, tpm=70)
        any_key, _ = store.create("open")
    tenant = authenticate(redis_url, bearer(key))
    assert tenant == Tenant("acme", record.key_id, ("demo",), 7, 70)
    assert authenticate(redis_url, [("Authorization", f"bearer  {key} ")]).name == "acme"
    assert authenticate(redis_url, bearer(key), model=None).name == "acme"
    assert authenticate(redis_url, bearer(any_key), model="whatever").name == "open"


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("x-api-key", "tl_" + "a" * 43)],
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "tl_" + "a" * 43)],
        [("authorization", "Bearer")],
        [("authorization", "Bearer tl_short")],
        [("authorization", "Bearer sk_" + "a" * 43)],
        [("authorization", "Bearer tl_" + "a" * 43)],  # well-formed, unknown
        [("authorization", "Bearer tl_" + "a" * 43), ("authorization", "Bearer tl_" + "b" * 43)],
    ],
)
def test_authenticate_refuses(redis_url: str, metadata: list[tuple[str, str]]) -> None:
    with ApiKeyStore(redis_url) as store:
        store.create("acme")
    with pytest.raises(AuthenticationError) as error:
        authenticate(redis_url, metadata)
    assert error.value.field == "authorization"
    for _, value in metadata:
        assert value.split()[-1] not in str(error.value)


def test_model_not_allowed_is_permission_denied(redis_url: str) -> None:
    with ApiKeyStore(redis_url) as store:
        key, _ = store.create("acme", ["demo"])
    with pytest.raises(PermissionDeniedError) as error:
        authenticate(redis_url, bearer(key), model="other")
    assert (error.value.tenant, error.value.model, error.value.field) == ("acme", "other", "model")


def test_revoke_takes_effect_after_the_cache_ttl(redis_url: str) -> None:
    with ApiKeyStore(redis_url) as store:
        key, record = store.create("acme")

    async def body(auth: Authenticator) -> None:
        assert (await auth.authenticate(bearer(key), "demo")).name == "acme"
        with ApiKeyStore(redis_url) as store:
            assert store.revoke(record.key_id)
        await asyncio.sleep(0.3)
        with pytest.raises(AuthenticationError) as error:
            await auth.authenticate(bearer(key), "demo")
        assert error.value.key_id == record.key_id

    run_with(redis_url, body, cache_ttl_s=0.2)


def test_positive_lookups_are_cached_for_the_ttl(redis_url: str) -> None:
    with ApiKeyStore(redis_url) as store:
        key, record = store.create("acme")

    async def body(auth: Authenticator) -> None:
        await auth.authenticate(bearer(key), "demo")
        with ApiKeyStore(redis_url) as store:
            store.revoke(record.key_id)
        # Within the TTL the replica still knows the key; Redis is not asked again.
        assert (await auth.authenticate(bearer(key), "demo")).name == "acme"

    run_with(redis_url, body, cache_ttl_s=30.0)


def test_new_key_works_at_once_unknown_keys_are_not_cached(redis_url: str) -> None:
    async def body(auth: Authenticator) -> None:
        with ApiKeyStore(redis_url) as store:
            key, _ = store.create("acme")
            store.revoke(hash_key(key)[:12])
        with pytest.raises(AuthenticationError):
            await auth.authenticate(bearer(key), None)
        with ApiKeyStore(redis_url) as store:
            fresh, _ = store.create("acme")
        assert (await auth.authenticate(bearer(fresh), None)).name == "acme"

    run_with(redis_url, body, cache_ttl_s=30.0)


def test_errors_pickle_with_their_fields() -> None:
    auth_error = pickle.loads(pickle.dumps(AuthenticationError("unknown or revoked API key", "0123456789ab")))
    assert (auth_error.reason, auth_error.key_id, auth_error.field) == (
        "unknown or revoked API key",
        "0123456789ab",
        "authorization",
    )
    denied = pickle.loads(pickle.dumps(PermissionDeniedError("acme", "demo")))
    assert (denied.tenant, denied.model, str(denied)) == (
        "acme",
        "demo",
        str(PermissionDeniedError("acme", "demo")),
    )


def test_logs_never_carry_the_key(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with ApiKeyStore(redis_url) as store:
        key, record = store.create("acme", ["demo"])
    authenticate(redis_url, bearer(key))
    with pytest.raises(PermissionDeniedError):
        authenticate(redis_url, bearer(key), "other")
    with ApiKeyStore(redis_url) as store:
        store.revoke(record.key_id)
    with pytest.raises(AuthenticationError):
        authenticate(redis_url, bearer(key))
    assert caplog.records
    for log in caplog.records:
        assert key[3:] not in repr(vars(log)) and key[3:] not in log.getMessage()


@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=80)), max_size=4))
def test_header_parsing_refuses_cleanly_or_returns_a_well_formed_key(metadata: list[tuple[str, str]]) -> None:
    try:
        key = bearer_key(metadata)
    except AuthenticationError:
        return
    assert key.startswith("tl_") and len(key) == 46


# ---- the CLI ------------------------------------------------------------------------------
def test_cli_create_list_revoke(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--redis-url", redis_url]
    assert (
        keys_main(["keys", "create", "--tenant", "acme", "--models", "demo, other", "--rpm", "5", *args]) == 0
    )
    created = capsys.readouterr()
    key = created.out.strip()
    assert created.out == key + "\n" and key.startswith("tl_") and len(key) == 46
    assert "not shown again" in created.err and key not in created.err
    key_id = hash_key(key)[:12]
    assert authenticate(redis_url, bearer(key)).name == "acme"

    assert keys_main(["keys", "list", *args]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "acme" in listing and "demo,other" in listing and key[3:] not in listing
    assert keys_main(["keys", "list", "--json", *args]) == 0
    assert f'"key_id": "{key_id}"' in capsys.readouterr().out

    assert keys_main(["keys", "revoke", key_id, *args]) == 0
    assert key_id in capsys.readouterr().out
    assert keys_main(["keys", "revoke", key_id, *args]) == 1
    assert "no key with id" in capsys.readouterr().err
    assert keys_main(["keys", "list", *args]) == 0
    assert key_id not in capsys.readouterr().out


def test_cli_reports_bad_input_and_unreachable_redis(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_main(["keys", "create", "--tenant", "a b", "--redis-url", redis_url]) == 1
    assert "tenant" in capsys.readouterr().err
    assert keys_main(["keys", "list", "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
    assert keys_main(["keys"]) == 2


def test_cli_registers_a_given_key_once_and_never_prints_it(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keys create --key-file`: a deployment's bootstrap key (the Helm chart's Job runs this)."""
    key = "tl_" + "A" * 20 + "b-_" * 7 + "xy"
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    # ${NAME} in --redis-url reads the environment (the chart passes the password this way).
    monkeypatch.setenv("QUEUE_URL_FOR_TEST", redis_url)
    args = [
        "keys",
        "create",
        "--tenant",
        "admin",
        "--key-file",
        str(key_file),
        "--redis-url",
        "${QUEUE_URL_FOR_TEST}",
    ]
    assert keys_main(args) == 0
    first = capsys.readouterr()
    assert first.out == f"registered: key id {hash_key(key)[:12]} for tenant 'admin'\n"
    assert authenticate(redis_url, bearer(key)).name == "admin"
    assert keys_main([*args[:3], "other", *args[4:]]) == 0, "a retried registration succeeds"
    again = capsys.readouterr()
    assert again.out.startswith("already registered") and "'admin'" in again.out
    assert key not in first.out + first.err + again.out + again.err

    key_file.write_text("tl_short-and-secret")
    assert keys_main(args) == 1
    refused = capsys.readouterr().err
    assert "key" in refused and "short-and-secret" not in refused
    assert keys_main([*args[:5], str(tmp_path / "missing"), *args[6:]]) == 1
    assert "--key-file" in capsys.readouterr().err
    monkeypatch.delenv("QUEUE_URL_FOR_TEST")
    assert keys_main(args) == 1
    assert "QUEUE_URL_FOR_TEST" in capsys.readouterr().err
