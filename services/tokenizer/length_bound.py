"""A cheap lower bound on the number of tokens a text encodes to.

Tokenizing costs time in proportion to the text, and a gRPC message may carry
megabytes of it: several seconds of tokenizer work for a prompt that is refused
anyway for not fitting the context. For tokenizers whose pipeline keeps every
character of the input, each token covers at most as many characters as its
longest vocabulary entry (byte-level vocabularies spell one byte per character,
and a character is at least one byte), so ``len(text) / longest`` tokens is a
lower bound that needs no tokenizing. Pipelines that may drop characters
(normalizers that strip accents, pre-tokenizers that remove whitespace) get no
bound, and every text is tokenized as before.
"""

from __future__ import annotations

import json
from typing import Any

# Pieces of a tokenizer.json pipeline that never drop or merge input characters.
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Digits", "Metaspace", "Split"})
_KEEPING_NORMALIZERS = frozenset({"Prepend", "Replace"})


def max_chars_per_token(backend: Any) -> int | None:
    """The most input characters one token of ``backend`` (a ``tokenizers.Tokenizer``) can
    cover, or None when its pipeline may drop characters and no such bound holds."""
    pipeline = json.loads(backend.to_str())
    if not _keeps_characters(pipeline.get("normalizer"), _KEEPING_NORMALIZERS, "normalizers"):
        return None
    if not _keeps_characters(pipeline.get("pre_tokenizer"), _KEEPING_PRE_TOKENIZERS, "pretokenizers"):
        return None
    model = pipeline.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not vocab:
        return None
    # Added tokens match their literal content anywhere in the input.
    added = [str(token.get("content", "")) for token in pipeline.get("added_tokens") or ()]
    return max(len(entry) for entry in [*vocab, *added])


def _keeps_characters(step: dict[str, Any] | None, keeping: frozenset[str], children: str) -> bool:
    if step is None:
        return True
    kind = step.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(child, keeping, children) for child in step.get(children, ()))
    if kind == "Split" and str(step.get("behavior", "")).lower() == "removed":
        return False
    if kind == "Replace":
        # Only a plain string replaced by one at least as long keeps the count of characters.
        pattern = (step.get("pattern") or {}).get("String")
        return isinstance(pattern, str) and len(pattern) <= len(str(step.get("content", "")))
    return kind in keeping
