"""The tokenizer deployment: prompts of every served model to token ids, batched.

Errors come back as values, not exceptions: a typed InvalidParameterError
survives the trip through Ray intact, and one bad prompt in a batch does not
fail the others. A variant published while the app runs is found in the served
variants hash (``services/queue/served_variants.py``); its tokenizer is loaded from
the variant's directory on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ray import serve

from services.errors import InvalidParameterError, ModelNotFoundError
from services.queue.served_variants import LiveVariants, ServedVariant, ServedVariantsSource
from services.serve_logs import route_to_serve_logs
from services.tokenizer.prompt import Prompt
from services.tokenizer.replies import MAX_PROMPTS_PER_CALL, Encoded, ModelInfo
from services.tokenizer.tokenizer import PromptTokenizer


class TokenizerService:
    def __init__(
        self,
        model_paths: Mapping[str, str],
        default_model: str,
        max_model_lens: Mapping[str, int | None] | None = None,
        served_variants: ServedVariantsSource | None = None,
    ) -> None:
        """``max_model_lens``: each model's configured engine context limit (None: the model's
        own), so that the ingress refuses a prompt the engine could not run. ``served_variants``:
        where to look up variants published while the app runs (None: only ``model_paths``)."""
        route_to_serve_logs()  # our records in this replica's Serve log
        limits = max_model_lens or {}
        self._tokenizers = {
            name: PromptTokenizer(path, limits.get(name)) for name, path in model_paths.items()
        }
        self._default_model = default_model
        self._live: LiveVariants | None = served_variants.async_view() if served_variants else None
        self._variant_tokenizers: dict[str, tuple[str, PromptTokenizer]] = {}  # name -> (checksum, tok)

    async def models(self) -> list[ModelInfo]:
        tokenizers = dict(self._tokenizers)
        if self._live is not None:
            for variant in (await self._live.all()).values():
                tokenizers.setdefault(variant.name, await self._variant_tokenizer(variant))
        return [
            ModelInfo(name, tok.max_context_length, tok.vocab_size, name == self._default_model)
            for name, tok in tokenizers.items()
        ]

    async def _tokenizer(self, model: str) -> PromptTokenizer | None:
        tokenizer = self._tokenizers.get(model)
        if tokenizer is not None or self._live is None:
            return tokenizer
        variant = await self._live.get(model)
        return None if variant is None else await self._variant_tokenizer(variant)

    async def _variant_tokenizer(self, variant: ServedVariant) -> PromptTokenizer:
        """The variant's tokenizer, loaded once per published version (off the event loop)."""
        loaded = self._variant_tokenizers.get(variant.name)
        if loaded is None or loaded[0] != variant.checksum:
            tokenizer = await asyncio.to_thread(PromptTokenizer, variant.artifact_dir, variant.max_model_len)
            loaded = (variant.checksum, tokenizer)
            self._variant_tokenizers[variant.name] = loaded
        return loaded[1]

    @serve.batch(max_batch_size=MAX_PROMPTS_PER_CALL, batch_wait_timeout_s=0.0)
    async def encode(self, requests: list[tuple[str, Prompt]]) -> list[Encoded]:
        """One ``(model, prompt)`` pair per call, as ingress replicas before ``encode_many`` call
        it: kept so that those still serving during a rolling update keep working."""
        return await self.encode_many(requests)

    async def encode_many(self, requests: list[tuple[str, Prompt]]) -> list[Encoded]:
        """Encode ``(model, prompt)`` pairs sent in one call (the ingress's ``TokenizeBatcher``),
        as one native batch per model; one reply per pair, in order."""
        results: list[Encoded] = [Encoded() for _ in requests]
        by_model: dict[str, list[int]] = {}
        for index, (model, _) in enumerate(requests):
            by_model.setdefault(model, []).append(index)
        for model, indices in by_model.items():
            tokenizer = await self._tokenizer(model)
            if tokenizer is None:
                error = InvalidParameterError("model", model, str(ModelNotFoundError(model)))
                for index in indices:
                    results[index] = Encoded(error=error)
                continue
            encoded = tokenizer.encode_batch([requests[i][1] for i in indices])
            for index, item in zip(indices, encoded, strict=True):
                results[index] = (
                    Encoded(error=item) if isinstance(item, InvalidParameterError) else Encoded(tuple(item))
                )
        return results
