"""API keys: issue, revoke, list; stored hashed in Redis.

A key is ``tl_`` + 32 random bytes, urlsafe base64 (46 characters). Redis never sees
the key, only its sha256 digest; nothing here logs it. Both hashes below change
together in one Lua script. ``services.ingress.auth`` checks keys at the edge.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from services.errors import InvalidParameterError, TokenlineError
from services.queue.connection import RedisOwner

logger = logging.getLogger(__name__)

KEY_PREFIX = "tl_"
KEY_ID_CHARS = 12
DEFAULT_CACHE_TTL_S = 2.0
DEFAULT_CACHE_ENTRIES = 10_000
MAX_NAME_CHARS = 128

_KEY_RANDOM_BYTES = 32
KEY_PATTERN = re.compile(r"^tl_[A-Za-z0-9_-]{43}$")  # token_urlsafe(32): 43 chars, no padding
_KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")  # like QueueConfig.key_prefix
_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?$")  # like ModelConfig.name (variants)
_CREATE_ATTEMPTS = 4


@dataclass(frozen=True)
class Tenant:
    """Who is calling, as the ingress and the rate limiter see it. Quotas: 0 = unlimited."""

    name: str
    key_id: str
    models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass(frozen=True)
class KeyRecord:
    """What Redis holds about one key (never the key). ``created_at``: Unix seconds."""

    key_id: str
    tenant: str
    models: tuple[str, ...]
    requests_per_minute: int
    tokens_per_minute: int
    created_at: float

    def to_tenant(self) -> Tenant:
        return Tenant(self.tenant, self.key_id, self.models, self.requests_per_minute, self.tokens_per_minute)

    def to_json(self, key_hash: str) -> str:
        return json.dumps(
            {
                "key_hash": key_hash,
                "key_id": self.key_id,
                "tenant": self.tenant,
                "models": list(self.models),
                "requests_per_minute": self.requests_per_minute,
                "tokens_per_minute": self.tokens_per_minute,
                "created_at": self.created_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> tuple[KeyRecord, str]:
        """The record and the key digest stored with it."""
        data: dict[str, Any] = json.loads(raw)
        record = cls(
            key_id=str(data["key_id"]),
            tenant=str(data["tenant"]),
            models=tuple(str(m) for m in data["models"]),
            requests_per_minute=int(data["requests_per_minute"]),
            tokens_per_minute=int(data["tokens_per_minute"]),
            created_at=float(data["created_at"]),
        )
        return record, str(data["key_hash"])


@dataclass(frozen=True)
class AuthKeys:
    """Redis keys of the API-key store."""

    prefix: str = "tl"

    @property
    def records(self) -> str:
        return f"{self.prefix}:auth:keys"

    @property
    def ids(self) -> str:
        return f"{self.prefix}:auth:ids"


# KEYS: records, ids   ARGV: key_hash, key_id, record_json
# Returns 1 when stored, 0 when the id or digest is taken (the caller draws a new key).
_CREATE = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: records, ids   ARGV: key_id
# Returns 1 when the key existed and is now gone, 0 when no key has that id.
_REVOKE = """
local key_hash = redis.call('HGET', KEYS[2], ARGV[1])
if not key_hash then
  return 0
end
redis.call('HDEL', KEYS[1], key_hash)
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key_hash: str) -> str:
    return key_hash[:KEY_ID_CHARS]


def check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise InvalidParameterError(field, value, f"must be 1..{MAX_NAME_CHARS} characters")
    if field == "models" and _MODEL_PATTERN.fullmatch(value):
        return value  # MODEL@RECIPE names a quantized variant
    if not _NAME_PATTERN.fullmatch(value):
        raise InvalidParameterError(field, value, "may contain only letters, digits, '_', '.' and '-'")
    return value


def check_quota(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameterError(field, value, "must be an integer >= 0 (0 = unlimited)")
    return value


def check_key_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix or not _NAME_PATTERN.fullmatch(prefix):
        raise InvalidParameterError("key_prefix", prefix, "must be letters, digits, '_', '.' or '-'")
    return prefix


class ApiKeyStore(RedisOwner):
    """Issue, revoke and list keys. Synchronous: used by ``tokenline keys``."""

    def __init__(self, redis_url: str, key_prefix: str = "tl") -> None:
        self._keys = AuthKeys(check_key_prefix(key_prefix))
        self._redis = redis.Redis.from_url(redis_url, protocol=2, decode_responses=True)
        self._create = self._redis.register_script(_CREATE)
        self._revoke = self._redis.register_script(_REVOKE)

    def create(
        self, tenant: str, models: Sequence[str] = (), rpm: int = 0, tpm: int = 0
    ) -> tuple[str, KeyRecord]:
        """A new key for ``tenant`` and its record. The key is returned here and nowhere else."""
        check_name("tenant", tenant)
        if isinstance(models, str):
            raise InvalidParameterError("models", models, "must be a list of model names, not one string")
        allowed = tuple(dict.fromkeys(check_name("models", m) for m in models))
        check_quota("requests_per_minute", rpm)
        check_quota("tokens_per_minute", tpm)
        for _ in range(_CREATE_ATTEMPTS):
            key = generate_key()
            key_hash = hash_key(key)
            record = KeyRecord(key_id_of(key_hash), tenant, allowed, rpm, tpm, time.time())
            stored = self._create(
                keys=[self._keys.records, self._keys.ids],
                args=[key_hash, record.key_id, record.to_json(key_hash)],
            )
            if stored:
                logger.info(
                    "api key created",
                    extra={
                        "key_id": record.key_id,
                        "tenant": tenant,
                        "models": list(allowed),
                        "requests_per_minute": rpm,
                        "tokens_per_minute": tpm,
                    },
                )
                return key, record
            logger.warning("api key id collision; drawing another key", extra={"key_id": record.key_id})
        raise TokenlineError(f"could not draw an unused key id in {_CREATE_ATTEMPTS} attempts")

    def register(
        self, key: str, tenant: str, models: Sequence[str] = (), rpm: int = 0, tpm: int = 0
    ) -> tuple[KeyRecord, bool]:
        """Store a key made elsewhere (a deployment's bootstrap key from a Kubernetes Secret).
        Idempotent: a key that is already stored keeps its record; the flag says whether it
        was stored now. The key itself never appears in an error or a log line."""
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            shown = f"<{len(key)} characters>" if isinstance(key, str) else type(key).__name__
            raise InvalidParameterError("key", shown, "must be tl_ followed by 43 of [A-Za-z0-9_-]")
        check_name("tenant", tenant)
        allowed = tuple(dict.fromkeys(check_name("models", m) for m in models))
        check_quota("requests_per_minute", rpm)
        check_quota("tokens_per_minute", tpm)
        key_hash = hash_key(key)
        record = KeyRecord(key_id_of(key_hash), tenant, allowed, rpm, tpm, time.time())
        keys = [self._keys.records, self._keys.ids]
        if self._create(keys=keys, args=[key_hash, record.key_id, record.to_json(key_hash)]):
            logger.info("api key registered", extra={"key_id": record.key_id, "tenant": tenant})
            return record, True
        existing: str | None = self._redis.hget(self._keys.records, key_hash)  # type: ignore[assignment]
        if existing is None:
            raise TokenlineError(f"key id {record.key_id} is taken by another key; use another key")
        return KeyRecord.from_json(existing)[0], False

    def revoke(self, key_id: str) -> bool:
        """Delete the key with this id. False when no key has it."""
        if not isinstance(key_id, str) or not _KEY_ID_PATTERN.fullmatch(key_id):
            raise InvalidParameterError("key_id", key_id, f"must be {KEY_ID_CHARS} lowercase hex characters")
        revoked = bool(self._revoke(keys=[self._keys.records, self._keys.ids], args=[key_id]))
        logger.info("api key revoke", extra={"key_id": key_id, "revoked": revoked})
        return revoked

    def list(self) -> builtins.list[KeyRecord]:
        """Every key's record (never a key), oldest first."""
        raw: dict[str, str] = self._redis.hgetall(self._keys.records)  # type: ignore[assignment]
        records = [KeyRecord.from_json(value)[0] for value in raw.values()]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))
