"""The run of byte-fallback tokens at the end of a stream of ids.

A SentencePiece decoder with byte fallback (Llama 2, Mistral) turns each maximal
run of consecutive ``<0xNN>`` tokens into text as a whole: the run's bytes as
UTF-8 when they are valid, otherwise one U+FFFD per token of the run. So the text
of a run is known only once the run has ended — or once its bytes contain an
invalid sequence, which no later byte can repair: from then on every token of the
run, earlier and later ones alike, is one U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping


class ByteRunTracker:
    """Follows, one id at a time, where the trailing run of byte tokens starts and
    whether its bytes are already invalid UTF-8. Costs O(1) per id."""

    def __init__(self, byte_values: Mapping[int, int]) -> None:
        self._byte_values = byte_values
        self._count = 0
        self._run_start = 0
        self._invalid = False
        # Strict and not final: raises on an invalid sequence, buffers an unfinished one.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")

    @property
    def run_start(self) -> int:
        """Index of the first token of the trailing run; the number of ids seen when the
        last id is not a byte token."""
        return self._run_start

    @property
    def invalid(self) -> bool:
        """The trailing run holds an invalid byte sequence (so it renders as U+FFFD per token)."""
        return self._invalid

    def is_byte(self, token_id: int) -> bool:
        return token_id in self._byte_values

    def extend(self, token_ids: Iterable[int]) -> None:
        for token_id in token_ids:
            self._count += 1
            value = self._byte_values.get(token_id)
            if value is None:
                self._run_start = self._count
                self._invalid = False
                self._utf8.reset()
            elif not self._invalid:
                try:
                    self._utf8.decode(bytes((value,)))
                except UnicodeDecodeError:
                    self._invalid = True
