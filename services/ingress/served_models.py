"""The models an ingress replica accepts requests for: the app's own, from its config, and the
variants published while it runs, from the served variants hash (refreshed on a short TTL).

A name that is in neither is NOT_FOUND. The tokenizer deployment knows each model's context
length and vocabulary; its answer is cached here until a model appears that it lacks.
"""

from __future__ import annotations

from typing import Any

from services.config import IngressConfig
from services.errors import ModelNotFoundError
from services.queue.served_variants import LiveVariants
from services.tokenizer.replies import ModelInfo


class ServedModels:
    def __init__(self, config: IngressConfig, live: LiveVariants | None, tokenizer: Any) -> None:
        self._config = config
        self._live = live
        self._tokenizer = tokenizer  # DeploymentHandle[TokenizerService]
        self._infos: dict[str, ModelInfo] = {}

    async def resolve(self, requested: str) -> str:
        """The served model a request names ('' = the default); ModelNotFoundError otherwise."""
        name = self._config.model_name(requested)
        if name is not None:
            return name
        if self._live is not None and await self._live.get(requested) is not None:
            return requested
        raise ModelNotFoundError(requested)

    async def default_max_tokens(self, model: str) -> int:
        own = self._config.default_max_tokens.get(model)
        if own is not None:
            return own
        variant = await self._live.get(model) if self._live is not None else None
        if variant is None:
            raise ModelNotFoundError(model)
        return variant.default_max_tokens

    async def info(self, model: str) -> ModelInfo:
        infos = await self._model_infos({model})
        found = infos.get(model)
        if found is None:
            raise ModelNotFoundError(model)
        return found

    async def listing(self) -> list[tuple[ModelInfo, dict[str, object]]]:
        """Every served model with its variant fields (none for a source model), for ListModels."""
        live = await self._live.all() if self._live is not None else {}
        own = self._config.default_max_tokens
        names = [*own, *(name for name in live if name not in own)]
        infos = await self._model_infos(set(names))
        listed: list[tuple[ModelInfo, dict[str, object]]] = []
        for name in names:
            if name not in infos:
                continue  # unpublished between the two reads
            fields = live[name].model_info_fields() if name in live else self._config.variant_fields(name)
            listed.append((infos[name], fields))
        return listed

    async def _model_infos(self, needed: set[str]) -> dict[str, ModelInfo]:
        if not self._infos or not needed <= self._infos.keys():
            infos: list[ModelInfo] = await self._tokenizer.models.remote()
            self._infos = {info.name: info for info in infos}
        return self._infos
