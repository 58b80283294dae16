"""The tokenizer deployment: prompts of every served model to token ids, batched.

Its replicas answer the ingress's calls from a Redis stream (``TokenizeStage``, one consumer
group: pulling balances the load, and a dead replica's calls are taken over); ``encode_many``
stays callable through Serve for ingress replicas of an earlier version. Errors come back as
values, not exceptions: a typed InvalidParameterError crosses intact (field, reason, the
short form of its value), and one bad prompt in a batch does not fail the others. A variant
published while the app runs is found in the served variants hash
(``services/queue/served_variants.py``); its tokenizer is loaded from the variant's directory
on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ray import serve

from services.errors import InvalidParameterError, ModelNotFoundError
from services.queue.config import QueueConfig
from services.queue.keys import consumer_name
from services.queue.served_variants import LiveVariants, ServedVariant, ServedVariantsSource
from services.queue.tokenize_calls import TokenizeCalls
from services.serve_logs import route_to_serve_logs
from services.tokenizer.prompt import Prompt
from services.tokenizer.replies import MAX_PROMPTS_PER_CALL, Encoded, ModelInfo
from services.tokenizer.stage import TAKE_BLOCK_MS, TokenizeStage
from services.tokenizer.tokenizer import PromptTokenizer

# A stopping replica waits this long for its call loop's last turn (one blocking read).
STOP_WAIT_S = TAKE_BLOCK_MS / 1000 + 1


class TokenizerService:
    def __init__(
        self,
        model_paths: Mapping[str, str],
        default_model: str,
        redis_url: str,
        queue_config: QueueConfig,
        max_model_lens: Mapping[str, int | None] | None = None,
        served_variants: ServedVariantsSource | None = None,
    ) -> None:
        """Answers the ingress's calls from the call stream in ``redis_url`` (and Serve calls to
        ``encode_many`` from ingress replicas of an earlier version during a rolling update).
        ``max_model_lens``: each model's configured engine context limit (None: the model's
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
        self._calls = TokenizeCalls(redis_url, queue_config)
        consumer = consumer_name()
        self._stage = TokenizeStage(self._calls, consumer, self.encode_many, queue_config.tokenize_reclaim_s)
        # Serve builds the replica on the event loop that serves it; the stage shares that loop.
        self._stage_task = asyncio.get_running_loop().create_task(self._stage.run())

    def check_health(self) -> None:
        task = self._stage_task
        if task.done():
            error = None if task.cancelled() else task.exception()
            raise RuntimeError(f"tokenizer call loop ended: {error!r}")

    async def __del__(self) -> None:
        """Ray Serve calls this on a graceful stop: calls taken and not answered are taken over
        by another replica once they have waited ``tokenize_reclaim_s``."""
        if hasattr(self, "_stage_task"):
            self._stage.stop()
            self._stage_task.cancel()
            await asyncio.wait({self._stage_task}, timeout=STOP_WAIT_S)
            await self._calls.aclose()

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
