"""The decoders a detokenizer replica renders with: the app's models and the variants
published while it runs, each variant's loaded from its directory on first use."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from services.detokenizer.incremental import TokenDecoder
from services.queue.served_variants import LiveVariantsSync
from services.tokenizer.decoding import TextDecoder


class ServedDecoders(Mapping[str, TokenDecoder]):
    def __init__(self, own: Mapping[str, TokenDecoder], live: LiveVariantsSync | None) -> None:
        self._own = dict(own)
        self._live = live
        self._variants: dict[str, tuple[str, TokenDecoder]] = {}  # name -> (checksum, decoder)

    def __getitem__(self, model: str) -> TokenDecoder:
        """Raises KeyError for a model that is neither the app's own nor a served variant, and
        QueueUnavailableError when the served variants cannot be read (the loop waits for Redis)."""
        own = self._own.get(model)
        if own is not None:
            return own
        variant = self._live.get(model) if self._live is not None else None
        if variant is None:
            raise KeyError(model)
        loaded = self._variants.get(model)
        if loaded is None or loaded[0] != variant.checksum:
            # Requests of a new variant are few at first; loading here, in the loop, costs them
            # one pause of the loop (well under a second for a tokenizer.json).
            loaded = (variant.checksum, TextDecoder.from_checkpoint(variant.artifact_dir))
            self._variants[model] = loaded
        return loaded[1]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._own, *self._variants])

    def __len__(self) -> int:
        return len(self._own) + len(self._variants)
