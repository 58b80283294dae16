"""The bytes of a tokenizer call and its reply (``services.queue.tokenize_calls`` moves them).

JSON, not pickle: Redis is shared by every replica, and a reply must not be able to run code
in the ingress. An error travels as its field, reason and the short form of its value (what
the ingress shows the client), never as the value itself: that may be a whole prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.errors import InvalidParameterError, short_repr
from services.tokenizer.prompt import ChatMessage, ChatPrompt, Prompt, TextPrompt, TokenIdsPrompt
from services.tokenizer.replies import Encoded


class TokenizerCallFailedError(RuntimeError):
    """The tokenizer replica failed a whole call (the ingress answers INTERNAL)."""


class ShownValue:
    """A value known only by its short form, which it shows as its repr."""

    def __init__(self, shown: str) -> None:
        self._shown = shown

    def __repr__(self) -> str:
        return self._shown


def encode_call(prompts: Sequence[tuple[str, Prompt]]) -> bytes:
    return json.dumps([[model, _prompt_fields(prompt)] for model, prompt in prompts]).encode()


def decode_call(payload: bytes) -> list[tuple[str, Prompt]]:
    return [(str(model), _prompt(fields)) for model, fields in json.loads(payload)]


def encode_reply(replies: Sequence[Encoded]) -> bytes:
    return json.dumps([_reply_fields(reply) for reply in replies]).encode()


def encode_failure(reason: str) -> bytes:
    """The reply to a call the tokenizer could not encode at all (not one bad prompt)."""
    return json.dumps({"failed": reason}).encode()


def decode_reply(payload: bytes) -> list[Encoded]:
    """One Encoded per prompt of the call; raises TokenizerCallFailedError for a failed call."""
    decoded = json.loads(payload)
    if isinstance(decoded, dict):
        raise TokenizerCallFailedError(str(decoded.get("failed", "unknown failure")))
    replies = []
    for fields in decoded:
        error = fields.get("error")
        if error is None:
            replies.append(Encoded(tuple(fields["ids"])))
        else:
            field, shown, reason = error
            replies.append(Encoded(error=InvalidParameterError(field, ShownValue(shown), reason)))
    return replies


def _prompt_fields(prompt: Prompt) -> dict[str, Any]:
    if isinstance(prompt, TextPrompt):
        return {"text": prompt.text, "special": prompt.add_special_tokens}
    if isinstance(prompt, ChatPrompt):
        return {"chat": [[message.role, message.content] for message in prompt.messages]}
    return {"ids": list(prompt.token_ids)}


def _prompt(fields: dict[str, Any]) -> Prompt:
    if "text" in fields:
        return TextPrompt(fields["text"], bool(fields["special"]))
    if "chat" in fields:
        return ChatPrompt([ChatMessage(role, content) for role, content in fields["chat"]])
    return TokenIdsPrompt(fields["ids"])


def _reply_fields(reply: Encoded) -> dict[str, Any]:
    if reply.error is None:
        return {"ids": list(reply.token_ids)}
    error = reply.error
    return {"error": [error.field, short_repr(error.value), error.reason]}
