"""`tokenline keys create|revoke|list`: manage API keys in Redis.

``create`` prints the new key once, alone on stdout (so ``KEY=$(tokenline keys create ...)``
works), and a warning on stderr that it is not shown again. Nothing else ever prints a key:
Redis holds only its digest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import redis

from services.config import expand_environment
from services.errors import InvalidParameterError, TokenlineError
from services.ingress.api_keys import ApiKeyStore, KeyRecord

T = TypeVar("T")


def add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="manage API keys (create, revoke, list)")
    keys.set_defaults(handler=lambda _args: _usage(keys))
    actions = keys.add_subparsers(title="actions")

    create = actions.add_parser("create", help="issue a key for a tenant; prints it once")
    create.add_argument("--tenant", required=True, help="tenant name (letters, digits, '_', '.', '-')")
    create.add_argument(
        "--models", default="", help="comma-separated models the key may use (default: all models)"
    )
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = unlimited)")
    create.add_argument(
        "--tpm", type=int, default=0, help="tokens per minute, prompt + max_tokens (0 = unlimited)"
    )
    create.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="register the key in this file instead of drawing one (a deployment's bootstrap key); "
        "idempotent, the key is not printed",
    )
    _add_redis_args(create)
    create.set_defaults(handler=_create)

    revoke = actions.add_parser("revoke", help="revoke a key by its id (effective within seconds)")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the 12-character id shown by 'keys list'")
    _add_redis_args(revoke)
    revoke.set_defaults(handler=_revoke)

    listing = actions.add_parser("list", help="list keys (ids and quotas, never the keys)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_redis_args(listing)
    listing.set_defaults(handler=_list)


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenline keys ...`` on its own (tests, ``python -m services.cli_keys keys ...``)."""
    from services.cli import dispatch

    parser = argparse.ArgumentParser(prog="tokenline")
    add_keys_commands(parser.add_subparsers(title="commands"))
    return dispatch(parser, argv)


def _add_redis_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        required=True,
        help="Redis the serving stack uses; ${NAME} in it reads an environment variable",
    )
    parser.add_argument("--key-prefix", default="tl", help="key prefix of the deployment (default: tl)")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _create(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.key_file is not None:
        return _register(args, models)
    key_and_record = _run(args, lambda store: store.create(args.tenant, models, args.rpm, args.tpm))
    if key_and_record is None:
        return 1
    key, record = key_and_record
    print(key, flush=True)
    _stderr(
        f"created key id {record.key_id} for tenant {record.tenant!r}. Store the key now: "
        "it is not shown again (Redis keeps only its digest)."
    )
    return 0


def _register(args: argparse.Namespace, models: list[str]) -> int:
    try:
        key = args.key_file.read_text().strip()
    except OSError as error:
        _stderr(f"error: --key-file: {error.strerror}: {args.key_file}")
        return 1
    outcome = _run(args, lambda store: store.register(key, args.tenant, models, args.rpm, args.tpm))
    if outcome is None:
        return 1
    record, stored = outcome
    state = "registered" if stored else "already registered"
    print(f"{state}: key id {record.key_id} for tenant {record.tenant!r}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    revoked = _run(args, lambda store: store.revoke(args.key_id))
    if revoked is None:
        return 1
    if not revoked:
        _stderr(f"no key with id {args.key_id}")
        return 1
    print(f"revoked {args.key_id}")
    _stderr("ingress replicas stop accepting it within their cache TTL (2 s by default)")
    return 0


def _list(args: argparse.Namespace) -> int:
    records = _run(args, lambda store: store.list())
    if records is None:
        return 1
    if args.json:
        for record in records:
            print(json.dumps(_as_dict(record)))
        return 0
    rows = [("KEY_ID", "TENANT", "MODELS", "RPM", "TPM", "CREATED")]
    rows += [
        (
            r.key_id,
            r.tenant,
            ",".join(r.models) or "*",
            str(r.requests_per_minute or "-"),
            str(r.tokens_per_minute or "-"),
            _timestamp(r.created_at),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _run(args: argparse.Namespace, action: Callable[[ApiKeyStore], T]) -> T | None:
    """Run ``action(store)``; report a bad argument or an unreachable Redis on stderr (None)."""
    try:
        with ApiKeyStore(expand_environment("--redis-url", args.redis_url), args.key_prefix) as store:
            return action(store)
    except InvalidParameterError as error:
        _stderr(f"error: {error.field}: {error.reason} (got {error.value!r})")
    except TokenlineError as error:
        _stderr(f"error: {error}")
    except (redis.ConnectionError, redis.TimeoutError) as error:
        _stderr(f"error: cannot reach Redis at the given --redis-url: {error}")
    except ValueError as error:  # a malformed --redis-url
        _stderr(f"error: --redis-url: {error}")
    return None


def _as_dict(record: KeyRecord) -> dict[str, object]:
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "models": list(record.models),
        "requests_per_minute": record.requests_per_minute,
        "tokens_per_minute": record.tokens_per_minute,
        "created_at": _timestamp(record.created_at),
    }


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
