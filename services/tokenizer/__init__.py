"""Tokenizer: prompt (text, chat or ids) -> validated token ids.

``PromptTokenizer`` lives in ``services.tokenizer.tokenizer`` (it needs transformers); this
package imports only the prompt types, which the ingress uses without tokenizing anything.
"""

from services.tokenizer.prompt import (
    KNOWN_CHAT_ROLES,
    ChatMessage,
    ChatPrompt,
    Prompt,
    TextPrompt,
    TokenIdsPrompt,
)

__all__ = [
    "KNOWN_CHAT_ROLES",
    "ChatMessage",
    "ChatPrompt",
    "Prompt",
    "TextPrompt",
    "TokenIdsPrompt",
]
