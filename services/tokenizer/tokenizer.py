"""Prompt -> token ids for one model, checked against its vocabulary and context.

Wraps the Hugging Face fast tokenizer of a checkpoint directory (local files
only: no hub is reachable). Every rejection is an ``InvalidParameterError``
naming the prompt field, so the gRPC edge can answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoTokenizer

from services.errors import InvalidParameterError
from services.tokenizer.decoding import NO_TOKENIZER_FILE, TextDecoder, checkpoint_tokenizer_file
from services.tokenizer.length_bound import max_chars_per_token
from services.tokenizer.prompt import (
    KNOWN_CHAT_ROLES,
    ChatMessage,
    ChatPrompt,
    Prompt,
    TextPrompt,
)

logger = logging.getLogger(__name__)


class PromptTokenizer:
    """Encodes text, chats and batches of prompts for the model in ``checkpoint_dir``."""

    def __init__(self, checkpoint_dir: str | os.PathLike[str], max_model_len: int | None = None) -> None:
        """``max_model_len``: the engine's configured context limit, if any; the tokenizer
        refuses prompts against the smaller of it and the model's own, as the engine would."""
        path = Path(checkpoint_dir)
        config = _read_json(path / "config.json")
        if config is None:
            raise InvalidParameterError("checkpoint_dir", str(path), "has no config.json")
        checkpoint_tokenizer_file(path)  # the detokenizer replicas read it directly
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise InvalidParameterError("checkpoint_dir", str(path), f"no tokenizer: {error}") from error
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidParameterError("checkpoint_dir", str(path), NO_TOKENIZER_FILE)
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        # Some tokenizer.json files carry truncation or padding settings; either would
        # silently change a prompt, so both are switched off for good.
        self._backend.no_truncation()
        self._backend.no_padding()
        self._decoder = TextDecoder(self._backend)
        model_limit = _positive_int(config, "max_position_embeddings", path)
        self._max_context_length = min(max_model_len or model_limit, model_limit)
        # Ids the tokenizer knows and the model's embedding has rows for; either may be
        # the larger (embeddings are often padded to a multiple of 64).
        model_vocab = config.get("vocab_size")
        self._vocab_size = (
            min(len(tokenizer), model_vocab) if isinstance(model_vocab, int) else len(tokenizer)
        )
        self._eos_token_ids = _eos_token_ids(config, _read_json(path / "generation_config.json"), tokenizer)
        self._max_chars_per_token = max_chars_per_token(self._backend)
        logger.info(
            "tokenizer loaded",
            extra={
                "checkpoint_dir": str(path),
                "vocab_size": self._vocab_size,
                "max_context_length": self._max_context_length,
                "eos_token_ids": list(self._eos_token_ids),
                "has_chat_template": self.has_chat_template,
                "max_chars_per_token": self._max_chars_per_token,
            },
        )

    @property
    def vocab_size(self) -> int:
        """Valid token ids are ``0 <= id < vocab_size``."""
        return self._vocab_size

    @property
    def max_context_length(self) -> int:
        """Most tokens one sequence may hold: prompt plus output."""
        return self._max_context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation unless ``ignore_eos`` is set."""
        return self._eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of any prompt shape, validated."""
        if isinstance(prompt, TextPrompt):
            return self.encode_text(prompt.text, add_special_tokens=prompt.add_special_tokens)
        if isinstance(prompt, ChatPrompt):
            return self.encode_chat(prompt.messages)
        return self.validate_token_ids(prompt.token_ids)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_text("prompt.text", text)
        self._check_fits_before_encoding(text)
        return self._checked_length(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The conversation rendered with the model's chat template, ending with the
        prompt for the assistant's turn. The template writes its own special tokens."""
        rendered = self._render_chat(messages)
        self._check_fits_before_encoding(rendered)
        return self._checked_length(self._backend.encode(rendered, add_special_tokens=False).ids)

    def validate_token_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = list(token_ids)
        if not ids:
            raise InvalidParameterError("prompt", ids, "is empty")
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            position, bad = next((i, t) for i, t in enumerate(ids) if not 0 <= t < self._vocab_size)
            raise InvalidParameterError(
                "prompt.token_ids", bad, f"id at position {position} is outside [0, {self._vocab_size})"
            )
        return self._checked_length(ids)

    def encode_batch(self, prompts: Sequence[Prompt]) -> list[list[int] | InvalidParameterError]:
        """Encode many prompts in one call to the native tokenizer.

        One bad prompt does not fail the others: its slot holds the error instead
        of the ids, in the order of ``prompts``.
        """
        results: list[list[int] | InvalidParameterError] = [[] for _ in prompts]
        pending: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # by add_special_tokens
        for index, prompt in enumerate(prompts):
            try:
                if isinstance(prompt, TextPrompt):
                    _check_text("prompt.text", prompt.text)
                    self._check_fits_before_encoding(prompt.text)
                    pending[prompt.add_special_tokens].append((index, prompt.text))
                elif isinstance(prompt, ChatPrompt):
                    rendered = self._render_chat(prompt.messages)
                    self._check_fits_before_encoding(rendered)
                    pending[False].append((index, rendered))
                else:
                    results[index] = self.validate_token_ids(prompt.token_ids)
            except InvalidParameterError as error:
                results[index] = error
        for add_special_tokens, items in pending.items():
            if not items:
                continue
            texts = [text for _, text in items]
            encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            for (index, _), encoding in zip(items, encodings, strict=True):
                try:
                    results[index] = self._checked_length(encoding.ids)
                except InvalidParameterError as error:
                    results[index] = error
        return results

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens, as ``tokenizer.decode(ids,
        skip_special_tokens=True)``. Calls the native tokenizer directly: this runs
        on every output step, and transformers' wrapper adds no behaviour for the
        BPE tokenizers of the Llama family."""
        return self._decoder.decode(token_ids)

    @property
    def skipped_token_ids(self) -> frozenset[int]:
        """Ids that ``decode`` leaves out (special tokens)."""
        return self._decoder.skipped_token_ids

    @property
    def byte_fallback_values(self) -> Mapping[int, int]:
        """Byte of each ``<0xNN>`` token of a byte-fallback SentencePiece tokenizer; empty
        for byte-level BPE (see services/tokenizer/decoding.py)."""
        return self._decoder.byte_fallback_values

    def _render_chat(self, messages: Sequence[ChatMessage]) -> str:
        if not messages:
            raise InvalidParameterError("prompt.chat", [], "has no messages")
        for index, message in enumerate(messages):
            if message.role not in KNOWN_CHAT_ROLES:
                # The role is client text: the error carries its length, never the text.
                raise InvalidParameterError(
                    "prompt.chat",
                    len(message.role),
                    f"message {index} has an unknown role of {len(message.role)} characters; "
                    f"expected one of {sorted(KNOWN_CHAT_ROLES)}",
                )
            _check_text("prompt.chat", message.content)
        if not self.has_chat_template:
            raise InvalidParameterError("prompt.chat", len(messages), "this model has no chat template")
        conversation = [{"role": message.role, "content": message.content} for message in messages]
        try:
            rendered = self._tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except jinja2.TemplateError as error:
            # Templates reject conversations they cannot express (for example roles
            # that do not alternate) by raising from inside the template.
            raise InvalidParameterError("prompt.chat", len(messages), f"chat template: {error}") from error
        if not isinstance(rendered, str):
            raise InvalidParameterError("prompt.chat", type(rendered).__name__, "template rendered no text")
        return rendered

    def _check_fits_before_encoding(self, text: str) -> None:
        """Refuse, without tokenizing it, a text too long to fit the context whatever its
        tokens (see length_bound); the error carries lengths only, never the text."""
        if self._max_chars_per_token is None:
            return
        at_least = -(-len(text) // self._max_chars_per_token)
        if at_least >= self._max_context_length:
            raise InvalidParameterError(
                "prompt",
                len(text),
                f"{len(text)} characters encode to at least {at_least} tokens, "
                f"leaving no room for output in a context of {self._max_context_length}",
            )

    def _checked_length(self, ids: list[int]) -> list[int]:
        if not ids:
            raise InvalidParameterError("prompt", 0, "encodes to no tokens")
        if len(ids) >= self._max_context_length:
            raise InvalidParameterError(
                "prompt",
                len(ids),
                f"{len(ids)} tokens leave no room for output in a context of {self._max_context_length}",
            )
        return ids


def _check_text(field: str, text: str) -> None:
    if not text:
        raise InvalidParameterError("prompt", text, "is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # Lone surrogates cannot become UTF-8 bytes, so no tokenizer can represent them.
        bad = text[error.start : error.end]
        raise InvalidParameterError(field, bad, f"not valid Unicode: {error.reason}") from error


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidParameterError("checkpoint_dir", str(path), f"unreadable JSON: {error}") from error
    if not isinstance(data, dict):
        raise InvalidParameterError("checkpoint_dir", str(path), "is not a JSON object")
    return data


def _positive_int(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise InvalidParameterError("checkpoint_dir", str(path), f"config.json {key} must be an integer >= 2")
    return value


def _eos_token_ids(
    config: dict[str, Any], generation_config: dict[str, Any] | None, tokenizer: Any
) -> tuple[int, ...]:
    """Union of the EOS ids the checkpoint declares anywhere; chat models often list
    several (end of turn and end of text) in generation_config.json only."""
    found: set[int] = set()
    declared = (config, generation_config or {}, {"eos_token_id": tokenizer.eos_token_id})
    for source in (settings.get("eos_token_id") for settings in declared):
        candidates = source if isinstance(source, list) else [source]
        found.update(c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c >= 0)
    return tuple(sorted(found))
