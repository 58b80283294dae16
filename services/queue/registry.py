"""The registry of published variants: one Redis hash under the app's key prefix.

``{prefix}:variants`` maps ``MODEL@RECIPE`` to a JSON :class:`VariantEntry`: the
source model and the hash of its weights, the recipe, the gate figures, the
artifact directory and its checksum, and when it was published. The optimizer
writes an entry only after the artifacts are complete on disk; serving reads it
to find (and verify) what to load.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis

from services.errors import InvalidParameterError
from services.queue.connection import RedisOwner

if TYPE_CHECKING:
    from services.config import AppConfig, ModelConfig

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class VariantEntry:
    name: str  # MODEL@RECIPE
    source_model: str  # name or directory the variant was made from
    source_weights_sha256: str
    recipe: str
    gate: dict[str, float]  # the gate report's figures
    artifact_dir: str
    checksum: str  # services.engine.models.manifest.directory_checksum of artifact_dir
    created_at: float  # Unix seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> VariantEntry:
        data: dict[str, Any] = json.loads(text)
        return VariantEntry(**data)


def variant_name(model: str, recipe: str) -> str:
    name = f"{model}@{recipe}"
    check_variant_name(name)
    return name


def check_variant_name(name: str) -> None:
    if not _VARIANT_NAME.match(name):
        raise InvalidParameterError("variant", name, "must be MODEL@RECIPE (letters, digits, '_', '.', '-')")


class VariantRegistry(RedisOwner):
    def __init__(self, url: str, key_prefix: str = "tl") -> None:
        self._redis = redis.Redis.from_url(url, protocol=2)
        self._key = f"{key_prefix}:variants"

    def publish(self, entry: VariantEntry) -> None:
        check_variant_name(entry.name)
        self._redis.hset(self._key, entry.name, entry.to_json())

    def get(self, name: str) -> VariantEntry | None:
        raw = self._redis.hget(self._key, name)
        return None if raw is None else VariantEntry.from_json(raw)

    def require(self, name: str) -> VariantEntry:
        entry = self.get(name)
        if entry is None:
            raise InvalidParameterError(
                "variants", name, "not published (run `tokenline optimize --publish`)"
            )
        return entry

    def all(self) -> list[VariantEntry]:
        return sorted(
            (VariantEntry.from_json(raw) for raw in self._redis.hvals(self._key)), key=lambda e: e.name
        )

    def remove(self, name: str) -> bool:
        return bool(self._redis.hdel(self._key, name))


def add_published_variants(config: AppConfig) -> AppConfig:
    """``config`` with one model per ``config.variants`` entry, looked up in the registry.

    Its artifacts are checked against the registry's checksum here, before any replica
    starts, so a changed directory fails the start with the variant named.
    """
    if not config.variants:
        return config
    models = list(config.models)
    with VariantRegistry(config.redis_url, config.queue.key_prefix) as registry:
        for name in config.variants:
            check_variant_name(name)
            models.append(variant_model_config(config, registry.require(name)))
    return config.model_validate({**config.model_dump(), "models": models, "variants": ()})


def variant_model_config(config: AppConfig, entry: VariantEntry) -> ModelConfig:
    """The model config that serves a published variant, its artifacts verified first.

    A variant inherits the engine settings of its source model when the app serves that too,
    and the defaults otherwise.
    """
    from pathlib import Path

    from services.config import ModelConfig, VariantInfo
    from services.engine.models.manifest import verify_manifest

    verify_manifest(Path(entry.artifact_dir), expected=entry.checksum)
    source = next((m for m in config.models if m.name == entry.source_model), ModelConfig())
    info = VariantInfo(
        variant_of=entry.source_model, recipe=entry.recipe, gate=entry.gate, checksum=entry.checksum
    )
    return source.model_copy(update={"name": entry.name, "path": entry.artifact_dir, "variant": info})
