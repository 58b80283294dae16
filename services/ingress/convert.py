"""Between the public protobuf messages and the typed internal ones.

Every field is checked here, at the edge; an error names the field as the
client spelled it (``sampling.top_p``, ``prompt.chat``, ``request_id``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from services.errors import InvalidParameterError
from services.messages import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    FinishReason,
    SamplingParams,
    TextDelta,
    TopLogprobs,
    Usage,
)
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.tokenizer.prompt import ChatMessage, ChatPrompt, Prompt, TextPrompt, TokenIdsPrompt

MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]+")
_OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "seed",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
)
_FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ABORT,
}


@dataclass(frozen=True)
class ParsedGenerate:
    """A validated GenerateRequest. ``max_tokens_set`` says whether the client chose
    max_tokens; if not, the ingress fills in the model's default once the prompt length is known."""

    request_id: str  # "" when the client left it to us
    model: str  # "" = the default model
    prompt: Prompt
    params: SamplingParams
    max_tokens_set: bool
    priority: int


def parse_generate(request: pb.GenerateRequest) -> ParsedGenerate:
    if request.request_id:
        check_request_id(request.request_id)
    sampling, max_tokens_set = parse_sampling(request.sampling)
    if not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:  # one queue stream per value
        reason = f"must be in [{MIN_PRIORITY}, {MAX_PRIORITY}]"
        raise InvalidParameterError("priority", request.priority, reason)
    return ParsedGenerate(
        request_id=request.request_id,
        model=request.model,
        prompt=parse_prompt(request),
        params=sampling,
        max_tokens_set=max_tokens_set,
        priority=request.priority,
    )


def check_request_id(request_id: str) -> None:
    """The shape of a client's request id: the same rule for Generate, Cancel and Resume.

    The error carries the length of an over-long id rather than the id: the details of an
    error are echoed to the client and logged, and an id may be megabytes long.
    """
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise InvalidParameterError(
            "request_id", len(request_id), f"must have 1-{MAX_REQUEST_ID_CHARS} characters"
        )
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidParameterError("request_id", request_id, "may hold only letters, digits and _.:-")


def parse_prompt(request: pb.GenerateRequest | pb.TokenizeRequest) -> Prompt:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if not request.text:
            raise InvalidParameterError("prompt.text", "", "must not be empty")
        add_special = True
        if isinstance(request, pb.TokenizeRequest) and request.HasField("add_special_tokens"):
            add_special = request.add_special_tokens
        return TextPrompt(request.text, add_special_tokens=add_special)
    if kind == "chat":
        messages = [ChatMessage(m.role, m.content) for m in request.chat.messages]
        if not messages:
            raise InvalidParameterError("prompt.chat", 0, "must hold at least one message")
        return ChatPrompt(messages)
    if kind == "token_ids" and isinstance(request, pb.GenerateRequest):
        if not request.token_ids.ids:
            raise InvalidParameterError("prompt.token_ids", 0, "must hold at least one id")
        return TokenIdsPrompt(list(request.token_ids.ids))
    raise InvalidParameterError("prompt", None, "set one of text, token_ids or chat")


def parse_sampling(message: pb.SamplingParams) -> tuple[SamplingParams, bool]:
    """Proto3 ``optional`` fields: unset keeps our default, a set zero is a zero."""
    values: dict[str, Any] = {
        name: getattr(message, name) for name in _OPTIONAL_SAMPLING_FIELDS if message.HasField(name)
    }
    if message.stop:
        values["stop"] = tuple(message.stop)
    if message.stop_token_ids:
        values["stop_token_ids"] = tuple(message.stop_token_ids)
    try:
        return SamplingParams(**values), "max_tokens" in values
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"sampling.{exc.field}", exc.value, exc.reason) from exc


def with_max_tokens(parsed: ParsedGenerate, max_tokens: int) -> ParsedGenerate:
    return replace(parsed, params=parsed.params.with_max_tokens(max_tokens))


def stream_response(delta: TextDelta) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        request_id=delta.request_id,
        text=delta.text,
        token_ids=delta.token_ids,
        token_index=delta.token_index,
        finish_reason=_FINISH_TO_PROTO[delta.finish_reason],
        matched_stop=delta.matched_stop,
        usage=usage_proto(delta.usage),
        logprobs=delta.logprobs,
        top_logprobs=top_logprobs_proto(delta.top_logprobs),
    )


def top_logprobs_proto(top_logprobs: TopLogprobs) -> list[pb.TopLogprobs]:
    return [
        pb.TopLogprobs(
            alternatives=[
                pb.TokenAlternative(token_id=a.token_id, logprob=a.logprob, text=a.text) for a in alternatives
            ]
        )
        for alternatives in top_logprobs
    ]


def usage_proto(usage: Usage | None) -> pb.Usage | None:
    if usage is None:
        return None
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )


def finish_reason_proto(reason: FinishReason | None) -> pb.FinishReason:
    return _FINISH_TO_PROTO[reason]


_Message = TypeVar("_Message", bound=Message)


def parse_message(message_type: type[_Message], raw: bytes) -> _Message:
    """A request message from the bytes the proxy forwards (see ``ingress.registration``)."""
    try:
        return message_type.FromString(raw)
    except DecodeError as error:
        reason = (
            f"not a valid {message_type.DESCRIPTOR.full_name}: a string field holds invalid UTF-8 "
            f"or the bytes are corrupt ({error})"
        )
        raise InvalidParameterError("request", f"{len(raw)} bytes", reason) from error
