"""Latencies of one streamed response, counted as vLLM's serving benchmark counts them (pure).

A stream is a sequence of messages, each arriving at some time and carrying zero or
more tokens. Only messages that carry tokens count:

- TTFT: from the request's start to the first message with a token;
- inter-token latency (ITL): the gap between consecutive such messages. A message
  that carries k tokens is one gap, not k - 1 gaps of zero (which would make
  batching look like free latency);
- TPOT (time per output token): (end-to-end - TTFT) / (tokens - 1), the mean
  decode time per token after the first; defined from two tokens on.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamTiming:
    tokens: int
    e2e_s: float  # start to the last message (token-carrying or not)
    ttft_s: float | None  # None when no token arrived
    itls_s: tuple[float, ...]
    tpot_s: float | None  # None below two tokens


def stream_timing(start: float, arrivals: Sequence[tuple[float, int]], end: float) -> StreamTiming:
    """``arrivals``: (arrival time, tokens carried) of every message, in order; ``end``:
    when the stream closed."""
    token_times = [when for when, count in arrivals if count > 0]
    tokens = sum(count for _, count in arrivals)
    e2e = end - start
    if not token_times:
        return StreamTiming(tokens, e2e, None, (), None)
    ttft = token_times[0] - start
    gaps = tuple(later - earlier for earlier, later in itertools.pairwise(token_times))
    tpot = (e2e - ttft) / (tokens - 1) if tokens >= 2 else None
    return StreamTiming(tokens, e2e, ttft, gaps, tpot)
