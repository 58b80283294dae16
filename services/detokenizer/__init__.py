"""Detokenizer: output token ids -> text deltas, with stop strings applied."""

from services.detokenizer.incremental import IncrementalDetokenizer, TokenDecoder
from services.detokenizer.stop import StopStringMatcher

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "TokenDecoder"]
