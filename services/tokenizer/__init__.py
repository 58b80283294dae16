"""Tokenizer: prompt (text, chat or ids) -> validated token ids."""

from services.tokenizer.prompt import (
    KNOWN_CHAT_ROLES,
    ChatMessage,
    ChatPrompt,
    Prompt,
    TextPrompt,
    TokenIdsPrompt,
)
from services.tokenizer.tokenizer import PromptTokenizer

__all__ = [
    "KNOWN_CHAT_ROLES",
    "ChatMessage",
    "ChatPrompt",
    "Prompt",
    "PromptTokenizer",
    "TextPrompt",
    "TokenIdsPrompt",
]
