"""Token ids -> text for one tokenizer, plus what incremental detokenization needs to know
about how that text is made.

Decoding is the Hugging Face ``tokenizers`` decode with special tokens skipped (what
``tokenizer.decode(ids, skip_special_tokens=True)`` returns). Two facts about the
decoder are exposed so that a stream of ids can be decoded piece by piece exactly:

- which ids the decode leaves out (special added tokens: they are removed before
  the decoder runs, so removing them up front changes nothing);
- for a SentencePiece tokenizer with byte fallback (Llama 2, Mistral), the byte value
  of each ``<0xNN>`` token: that decoder turns a whole run of consecutive byte tokens
  into text at once, and into one U+FFFD per token when the run is not valid UTF-8.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from services.errors import InvalidParameterError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
TOKENIZER_FILE = "tokenizer.json"
NO_TOKENIZER_FILE = "needs a tokenizer.json (fast tokenizer)"


class TextDecoder:
    """Decodes ids to text with one ``tokenizers.Tokenizer``."""

    def __init__(self, backend: Tokenizer) -> None:
        self._backend = backend
        self._skipped = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )
        self._byte_values = _byte_fallback_values(backend)

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike[str]) -> TextDecoder:
        """From a bare ``tokenizer.json`` (no config files needed)."""
        return cls(Tokenizer.from_file(str(Path(tokenizer_json))))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike[str]) -> TextDecoder:
        """The decoder of a checkpoint's ``tokenizer.json``, read without transformers: a
        process that only decodes (a detokenizer replica) then needs neither transformers nor
        the torch it imports, ~5 s of CPU at every start. It decodes as ``PromptTokenizer``
        does; tests/test_detokenizer_families.py holds the two side by side."""
        path = checkpoint_tokenizer_file(checkpoint_dir)
        try:
            return cls.from_file(path)
        except Exception as error:  # tokenizers raises plain Exception on a malformed file
            raise InvalidParameterError("checkpoint_dir", str(path), f"unreadable: {error}") from error

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        text: str = self._backend.decode(list(token_ids), skip_special_tokens=True)
        return text

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without added special tokens (for tests and tools)."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        return ids

    @property
    def vocab_size(self) -> int:
        """Ids ``0 <= id < vocab_size`` exist, added tokens included."""
        size: int = self._backend.get_vocab_size(with_added_tokens=True)
        return size

    @property
    def skipped_token_ids(self) -> frozenset[int]:
        """Ids that decode to nothing wherever they stand (special tokens)."""
        return self._skipped

    @property
    def byte_fallback_values(self) -> Mapping[int, int]:
        """Byte value of each byte-fallback token id; empty unless the decoder has a
        ByteFallback step (byte-level BPE tokenizers have none)."""
        return self._byte_values


def checkpoint_tokenizer_file(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint's ``tokenizer.json``; a checkpoint without one is refused, naming the
    directory. The tokenizer and detokenizer deployments both require it (the detokenizer
    reads it directly), even where transformers could convert a slow tokenizer."""
    path = Path(checkpoint_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise InvalidParameterError("checkpoint_dir", str(checkpoint_dir), NO_TOKENIZER_FILE)
    return path


def _byte_fallback_values(backend: Tokenizer) -> dict[int, int]:
    if not _has_decoder_step(json.loads(backend.to_str()).get("decoder"), "ByteFallback"):
        return {}
    values: dict[int, int] = {}
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            values[token_id] = int(match.group(1), 16)
    return values


def _has_decoder_step(decoder: Any, step: str) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == step:
        return True
    return any(_has_decoder_step(inner, step) for inner in decoder.get("decoders") or [])
