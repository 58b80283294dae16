"""API keys: issue, revoke, list (sync, for the CLI) and authenticate (async, for the ingress).

A key is ``tl_`` + 32 random bytes, urlsafe base64 (46 characters). Redis never sees
the key, only its sha256 digest; nothing here logs it. Layout (prefix ``tl``):

- ``tl:auth:keys`` hash: sha256 hex of a key -> JSON record (tenant, models, quotas, ...)
- ``tl:auth:ids``  hash: key id (first 12 hex chars of the digest) -> sha256 hex

Both hashes change together in one Lua script. The ingress finds a record by the
digest of the presented key, so lookup timing depends only on a digest an attacker
cannot steer toward a stored one; the one byte-wise comparison left (stored digest
against computed digest) is constant-time.

Revocation: ``Authenticator`` caches positive lookups for ``cache_ttl_s`` (default
2 s) per ingress replica, so a revoked key stops working within that time on every
replica. Unknown keys are never cached: a new key works at once.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable, Sequence

from services.errors import InvalidParameterError, TokenlineError
from services.ingress.api_keys import (
    DEFAULT_CACHE_ENTRIES,
    DEFAULT_CACHE_TTL_S,
    KEY_PATTERN,
    KEY_PREFIX,
    AuthKeys,
    KeyRecord,
    Tenant,
    check_key_prefix,
    hash_key,
    key_id_of,
)
from services.queue.connection import AsyncRedisOwner, async_redis
from services.queue.outage import guard_async

logger = logging.getLogger(__name__)

_AUTH_HEADER = "authorization"
_SCHEME = "bearer"


class AuthenticationError(TokenlineError):
    """The call carries no usable API key: missing, malformed, unknown or revoked (UNAUTHENTICATED).

    ``key_id`` is the id of a well-formed key that Redis does not know ('' otherwise); the
    key itself is never part of the error.
    """

    field = _AUTH_HEADER

    def __init__(self, reason: str, key_id: str = "") -> None:
        self._init_args = (reason, key_id)
        self.reason = reason
        self.key_id = key_id
        self.value = key_id
        suffix = f" (key id {key_id})" if key_id else ""
        super().__init__(f"{self.field}: {reason}{suffix}")


class PermissionDeniedError(TokenlineError):
    """The tenant's key does not allow this model (PERMISSION_DENIED)."""

    field = "model"

    def __init__(self, tenant: str, model: str) -> None:
        self._init_args = (tenant, model)
        self.tenant = tenant
        self.model = model
        self.value = model
        super().__init__(f"model={model!r}: not allowed for tenant {tenant!r}")


def bearer_key(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The API key of ``authorization: Bearer <key>``, or AuthenticationError.

    Header name and scheme are case-insensitive; more than one authorization entry is refused.
    """
    values = [value for name, value in metadata if isinstance(name, str) and name.lower() == _AUTH_HEADER]
    if not values:
        raise AuthenticationError("missing 'authorization: Bearer <key>' metadata")
    if len(values) > 1:
        raise AuthenticationError("more than one authorization metadata entry")
    value = values[0]
    if not isinstance(value, str):
        raise AuthenticationError("authorization metadata must be text")
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != _SCHEME:
        raise AuthenticationError("authorization scheme must be 'Bearer'")
    key = key.strip()
    if not KEY_PATTERN.fullmatch(key):
        raise AuthenticationError(f"malformed API key (expected {KEY_PREFIX} + 43 urlsafe characters)")
    return key


class Authenticator(AsyncRedisOwner):
    """Turns a call's gRPC metadata into a ``Tenant``. Asynchronous: used by the ingress.

    Positive lookups are cached for ``cache_ttl_s`` seconds (at most ``cache_entries``
    keys), so a revoke reaches this replica within that time. A Redis outage fails closed:
    the connection error propagates.
    """

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = "tl",
        *,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        if isinstance(cache_ttl_s, bool) or not isinstance(cache_ttl_s, (int, float)) or cache_ttl_s < 0:
            raise InvalidParameterError("cache_ttl_s", cache_ttl_s, "must be a number >= 0 (0: no cache)")
        if isinstance(cache_entries, bool) or not isinstance(cache_entries, int) or cache_entries < 1:
            raise InvalidParameterError("cache_entries", cache_entries, "must be an integer >= 1")
        self._keys = AuthKeys(check_key_prefix(key_prefix))
        self._redis = async_redis(redis_url, decode_responses=True)
        self._cache_ttl_s = float(cache_ttl_s)
        self._cache_entries = cache_entries
        self._cache: dict[str, tuple[float, Tenant]] = {}  # key digest -> (expires, tenant)

    async def authenticate(self, metadata: Sequence[tuple[str, str]], model: str | None) -> Tenant:
        """The tenant behind ``authorization: Bearer <key>``.

        ``model``: the resolved model the call is for (None: no model involved, e.g.
        ListModels). Raises AuthenticationError or PermissionDeniedError.
        """
        try:
            key = bearer_key(metadata)
        except AuthenticationError as error:
            logger.info("authentication refused", extra={"reason": error.reason})
            raise
        key_hash = hash_key(key)
        tenant = self._cached(key_hash)
        if tenant is None:
            tenant = await self._lookup(key_hash)
        if model is not None and not tenant.allows(model):
            logger.info(
                "model not allowed for tenant",
                extra={"tenant": tenant.name, "key_id": tenant.key_id, "model": model},
            )
            raise PermissionDeniedError(tenant.name, model)
        return tenant

    @guard_async
    async def _lookup(self, key_hash: str) -> Tenant:
        key_id = key_id_of(key_hash)
        raw = await self._redis.hget(self._keys.records, key_hash)  # type: ignore[misc]
        if raw is None:
            logger.info("authentication refused", extra={"reason": "unknown key", "key_id": key_id})
            raise AuthenticationError("unknown or revoked API key", key_id)
        record, stored_hash = KeyRecord.from_json(raw)
        if not hmac.compare_digest(stored_hash, key_hash):
            logger.error("api key record does not match its digest", extra={"key_id": key_id})
            raise AuthenticationError("unknown or revoked API key", key_id)
        tenant = record.to_tenant()
        self._remember(key_hash, tenant)
        return tenant

    def _cached(self, key_hash: str) -> Tenant | None:
        entry = self._cache.get(key_hash)
        if entry is None:
            return None
        expires, tenant = entry
        if time.monotonic() >= expires:
            del self._cache[key_hash]
            return None
        return tenant

    def _remember(self, key_hash: str, tenant: Tenant) -> None:
        if self._cache_ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._cache) >= self._cache_entries:
            self._cache = {h: e for h, e in self._cache.items() if e[0] > now}
            while len(self._cache) >= self._cache_entries:  # all live: drop the oldest inserted
                del self._cache[next(iter(self._cache))]
        self._cache[key_hash] = (now + self._cache_ttl_s, tenant)
