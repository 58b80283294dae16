"""Typed messages that cross a process boundary.

The engine core consumes ``SamplingParams`` and emits token ids only; text and
stop strings live on the output side (detokenizer). Every message here is a
frozen dataclass with a ``to_dict``/``from_dict`` pair so that the Redis queue
can carry it as JSON without an untyped dict leaking into the code.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from services.errors import InvalidParameterError

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
# Backends keep token counts in signed 32-bit integers (vLLM, CUDA kernels), and no model's
# context comes near this; a larger value is a client bug such as an unsigned wrap-around.
MAX_TOKENS_LIMIT = 2**31 - 1
# Priorities (lower is served first) are bounded because the queue keeps one stream per value:
# 31 levels, with the default 0 in the middle so that a client can both raise and lower a request.
MIN_PRIORITY = -15
MAX_PRIORITY = 15


class FinishReason(str, enum.Enum):
    """Why a sequence ended. ``None`` (not an enum member) means "still running"."""

    STOP = "stop"  # an EOS / stop token id, or a stop string on the output side
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the client or the system
    ERROR = "error"  # the request failed (dead-lettered); never produced by a healthy engine


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    ``seed`` makes sampling reproducible: the random draw for output token ``i``
    depends only on ``(seed, i)``, never on the batch or the replica.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # applied by the detokenizer, not by the engine
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top alternatives to return per token

    def __post_init__(self) -> None:
        # Tuples keep the dataclass hashable and immutable even when callers pass lists.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        _finite("temperature", self.temperature)
        if self.temperature < 0.0:
            raise InvalidParameterError("temperature", self.temperature, "must be >= 0")
        _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", self.top_p, "must be in (0, 1]")
        _integer("top_k", self.top_k)
        if self.top_k < -1 or self.top_k == 0:
            raise InvalidParameterError("top_k", self.top_k, "must be -1 (disabled) or >= 1")
        _finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError("min_p", self.min_p, "must be in [0, 1]")
        _integer("max_tokens", self.max_tokens)
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidParameterError("max_tokens", self.max_tokens, f"must be in [1, {MAX_TOKENS_LIMIT}]")
        self._validate_stop_strings()
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParameterError(
                "stop_token_ids", len(self.stop_token_ids), f"at most {MAX_STOP_TOKEN_IDS} ids"
            )
        for token_id in self.stop_token_ids:
            _integer("stop_token_ids", token_id)
            if token_id < 0:
                raise InvalidParameterError("stop_token_ids", token_id, "must be >= 0")
        if self.seed is not None:
            _integer("seed", self.seed)
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidParameterError("seed", self.seed, f"must be in [0, {MAX_SEED}]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _finite(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameterError(name, value, "must be in [-2, 2]")
        _finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise InvalidParameterError("repetition_penalty", self.repetition_penalty, "must be > 0")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise InvalidParameterError("logprobs", self.logprobs, f"must be in [0, {MAX_LOGPROBS}]")

    def _validate_stop_strings(self) -> None:
        """Stop strings are client text, often taken from the prompt: an error carries their
        count, index and length, never the text, because errors end up in logs."""
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError("stop", len(self.stop), f"at most {MAX_STOP_STRINGS} stop strings")
        for index, text in enumerate(self.stop):
            if not isinstance(text, str):
                raise InvalidParameterError(
                    "stop", type(text).__name__, f"stop string {index} is not a string"
                )
            if not 1 <= len(text) <= MAX_STOP_STRING_CHARS:
                raise InvalidParameterError(
                    "stop",
                    len(text),
                    f"stop string {index} has {len(text)} characters, not 1..{MAX_STOP_STRING_CHARS}",
                )

    def with_max_tokens(self, max_tokens: int) -> SamplingParams:
        return replace(self, max_tokens=max_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidParameterError("sampling", sorted(unknown), "unknown fields")
        return cls(**data)


@dataclass(frozen=True)
class GenerationRequest:
    """One accepted request, as the ingress appends it to the model's queue."""

    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0
    tenant: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "prompt_token_ids": list(self.prompt_token_ids),
            "params": self.params.to_dict(),
            "priority": self.priority,
            "arrival_time": self.arrival_time,
            "tenant": self.tenant,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        return cls(
            request_id=str(data["request_id"]),
            model=str(data["model"]),
            prompt_token_ids=tuple(int(t) for t in data["prompt_token_ids"]),
            params=SamplingParams.from_dict(dict(data["params"])),
            priority=int(data.get("priority", 0)),
            arrival_time=float(data.get("arrival_time", 0.0)),
            tenant=str(data.get("tenant", "")),
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at an output position. ``text`` is the token decoded on
    its own (filled in by the detokenizer; empty in token chunks)."""

    token_id: int
    logprob: float
    text: str = ""


# Per output token: its top alternatives, most likely first.
TopLogprobs = tuple[tuple[TopLogprob, ...], ...]


@dataclass(frozen=True)
class TokenChunk:
    """New output tokens of one request: ids for output indices
    ``[start_index, start_index + len(token_ids))``. The last chunk of a request
    has ``finish_reason`` set and carries the usage."""

    request_id: str
    start_index: int
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str = ""
    logprobs: tuple[float, ...] = field(default=())
    top_logprobs: TopLogprobs = ()  # one entry per token when the request asked for logprobs > 0

    @property
    def end_index(self) -> int:
        return self.start_index + len(self.token_ids)


def _finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(name, value, "must be a finite number")


def _integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, value, "must be an integer")


@dataclass(frozen=True)
class StreamRequest:
    """Ingress -> detokenizer: stream the text of one request's output stream.

    ``from_token`` skips output indices the client already has (a resumed stream).
    """

    request_id: str
    model: str
    num_prompt_tokens: int
    stop: tuple[str, ...] = ()
    from_token: int = 0


@dataclass(frozen=True)
class TextDelta:
    """Detokenizer -> ingress: new text and the token ids it came from.

    ``token_index`` is the output index of ``token_ids[0]``. The last delta of a
    request has ``finish_reason`` set, and ``usage`` for a finished request.
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    token_index: int = 0
    finish_reason: FinishReason | None = None
    matched_stop: str = ""
    usage: Usage | None = None
    error: str = ""
    logprobs: tuple[float, ...] = ()
    top_logprobs: TopLogprobs = ()  # one entry per token, alternatives with their text
    # (tokens, characters) of each engine chunk this delta joins, in order; empty: one piece.
    # They let a reader that resumes inside a delta cut its text where its tokens start.
    pieces: tuple[tuple[int, int], ...] = ()

    def piece_sizes(self) -> tuple[tuple[int, int], ...]:
        return self.pieces or ((len(self.token_ids), len(self.text)),)

    def from_token(self, index: int) -> TextDelta | None:
        """The part for tokens ``index`` on (None when nothing of it is left and it is not the
        last delta). Text is cut at the first piece that reaches ``index``: exact when pieces
        hold one token each, as an engine step writes them."""
        if index <= self.token_index:
            return self
        if self.token_index + len(self.token_ids) <= index and self.finish_reason is None:
            return None
        tokens, chars, kept = 0, 0, []
        for size in self.piece_sizes():
            if self.token_index + tokens + size[0] > index:
                kept.append(size)
            else:
                tokens, chars = tokens + size[0], chars + size[1]
        cut = min(len(self.token_ids), index - self.token_index)
        return replace(
            self,
            text=self.text[chars:],
            token_ids=self.token_ids[cut:],
            token_index=self.token_index + cut,
            logprobs=self.logprobs[cut:],
            top_logprobs=self.top_logprobs[cut:],
            pieces=tuple(kept),
        )


def merge_text_deltas(deltas: Sequence[TextDelta]) -> TextDelta:
    """Consecutive deltas of one request as one message; the last one's ending wins."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    return replace(
        last,
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        token_index=deltas[0].token_index,
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
        top_logprobs=tuple(top for d in deltas for top in d.top_logprobs),
        pieces=tuple(size for d in deltas for size in d.piece_sizes()),
    )
