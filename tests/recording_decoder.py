"""A decoder wrapper for the detokenizer tests: how many ids each decode call was given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.detokenizer import TokenDecoder


class RecordingDecoder:
    """``decoder`` as it is, recording the window size of each decode call."""

    def __init__(self, decoder: TokenDecoder) -> None:
        self._decoder = decoder
        self.window_sizes: list[int] = []

    def decode(self, token_ids: Sequence[int]) -> str:
        self.window_sizes.append(len(token_ids))
        return self._decoder.decode(token_ids)

    @property
    def skipped_token_ids(self) -> frozenset[int]:
        return self._decoder.skipped_token_ids

    @property
    def byte_fallback_values(self) -> Mapping[int, int]:
        return self._decoder.byte_fallback_values
