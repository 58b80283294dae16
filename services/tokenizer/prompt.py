"""The three shapes a prompt can take, as typed values the tokenizer accepts.

They mirror the ``prompt`` oneof of ``tokenline.v1.GenerateRequest``: plain
text, a chat conversation, or token ids the client tokenized itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Roles the tokenizer accepts in a chat; a model's template may support fewer.
KNOWN_CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class TextPrompt:
    """Plain text; ``add_special_tokens`` adds the model's BOS and the like."""

    text: str
    add_special_tokens: bool = True


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the model's chat template and generation prompt."""

    messages: tuple[ChatMessage, ...]

    def __init__(self, messages: Sequence[ChatMessage]) -> None:
        # A tuple keeps the prompt immutable and hashable even when callers pass a list.
        object.__setattr__(self, "messages", tuple(messages))


@dataclass(frozen=True)
class TokenIdsPrompt:
    """Token ids used as given: no special tokens are added."""

    token_ids: tuple[int, ...]

    def __init__(self, token_ids: Sequence[int]) -> None:
        object.__setattr__(self, "token_ids", tuple(token_ids))


Prompt = TextPrompt | ChatPrompt | TokenIdsPrompt
