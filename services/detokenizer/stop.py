"""Stop strings on a stream of text deltas.

The output ends at the first stop string to *complete* in the text (as if the
text were checked after every character), cut before that stop string, which
is never sent. Where two complete at the same character, the one that starts
first wins, so no part of a stop string is sent either. Text that may still
turn out to begin a stop string is held back until it is decided; when the
stream ends without a match, ``finish`` releases it.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.errors import InvalidParameterError


class StopStringMatcher:
    """Finds the first stop string in the text of one sequence, fed in deltas."""

    def __init__(self, stops: Sequence[str]) -> None:
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise InvalidParameterError("stop", stop, "each stop string must be a non-empty string")
        self._stops = tuple(dict.fromkeys(stops))  # duplicates would only cost time
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, once one has."""
        return self._matched

    @property
    def held_back(self) -> str:
        """Text received but not released: it may still begin a stop string."""
        return self._held

    def push(self, delta: str) -> tuple[str, str | None]:
        """Feed the next text; return (text safe to send, stop string matched now).

        After a match the text is over: later deltas (tokens the engine produced
        before it learned of the stop) are swallowed and ``("", None)`` returned.
        """
        if self._matched is not None or not delta:
            return "", None
        text = self._held + delta
        match = self._first_completed(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self._matched = stop
            return text[:start], stop
        keep = self._undecided_suffix_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def finish(self) -> str:
        """The stream ended: release the held-back text (empty after a match)."""
        released, self._held = self._held, ""
        return released

    def _first_completed(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the occurrence that ends first, then starts first."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _undecided_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            # Only a suffix shorter than the stop string can still grow into it, and
            # only one longer than the best so far matters.
            first = max(0, len(text) - len(stop) + 1)
            limit = len(text) - longest
            start = text.find(stop[0], first, limit)
            while start >= 0:
                if stop.startswith(text[start:]):
                    longest = len(text) - start
                    break
                start = text.find(stop[0], start + 1, limit)
        return longest
