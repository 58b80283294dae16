"""Stream entry <-> message codec, shared by the engine and the client side.

Token ids travel packed (little-endian uint32) in one field rather than one field
per id: a 512-token prompt is one 2 KiB value instead of 512 hash fields. Request
entries carry a codec version so that a rolling upgrade can refuse what it cannot
read instead of misreading it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from services.errors import InvalidParameterError
from services.messages import (
    FinishReason,
    GenerationRequest,
    StreamRequest,
    TextDelta,
    TokenChunk,
    TopLogprobs,
    Usage,
)
from services.queue.logprob_fields import decode_top_logprobs, encode_top_logprobs

CODEC_VERSION = b"1"
MAX_TOKEN_ID = 2**32 - 1

# Request entry fields.
VERSION = "v"
REQUEST_ID = "id"
PROMPT_IDS = "p"
METADATA = "m"

# Output chunk fields.
START_INDEX = "s"
TOKEN_IDS = "t"
FINISH_REASON = "f"
USAGE = "u"
ERROR = "e"
LOGPROBS = "l"
# Top alternatives of each token: see logprob_fields.py (n, a, b; and c in text entries).
# Text entry fields (besides the chunk fields above, which keep their meaning).
TEXT = "x"
MATCHED_STOP = "m"
PIECES = "o"

Fields = dict[str, bytes]
RawFields = Mapping[bytes, bytes]


def pack_token_ids(field: str, token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        reason = f"each id must be an int in [0, {MAX_TOKEN_ID}]"
        raise InvalidParameterError(field, list(token_ids), reason) from exc


def unpack_token_ids(field: str, packed: bytes) -> tuple[int, ...]:
    if len(packed) % 4:
        raise InvalidParameterError(field, len(packed), "packed ids must be a multiple of 4 bytes")
    return struct.unpack(f"<{len(packed) // 4}I", packed)


def encode_request(request: GenerationRequest) -> Fields:
    metadata = request.to_dict()
    del metadata["request_id"], metadata["prompt_token_ids"]
    return {
        VERSION: CODEC_VERSION,
        REQUEST_ID: request.request_id.encode(),
        PROMPT_IDS: pack_token_ids("prompt_token_ids", request.prompt_token_ids),
        METADATA: json.dumps(metadata, separators=(",", ":")).encode(),
    }


def request_id_of(fields: RawFields) -> str | None:
    """The request id of an entry that may not decode as a whole (for dead-lettering)."""
    raw = fields.get(REQUEST_ID.encode())
    return raw.decode(errors="replace") if raw else None


def decode_request(fields: RawFields) -> GenerationRequest:
    version = fields.get(VERSION.encode())
    if version != CODEC_VERSION:
        reason = f"unsupported request codec version (this build reads {CODEC_VERSION!r})"
        raise InvalidParameterError(VERSION, version, reason)
    try:
        metadata: dict[str, Any] = json.loads(_required(fields, METADATA))
        metadata["request_id"] = _required(fields, REQUEST_ID).decode()
        metadata["prompt_token_ids"] = unpack_token_ids(PROMPT_IDS, _required(fields, PROMPT_IDS))
        return GenerationRequest.from_dict(metadata)
    except InvalidParameterError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidParameterError("request entry", sorted(fields), f"cannot decode: {exc}") from exc


def encode_chunk(chunk: TokenChunk) -> Fields:
    fields: Fields = {START_INDEX: str(chunk.start_index).encode()}
    if chunk.token_ids:
        fields[TOKEN_IDS] = pack_token_ids("token_ids", chunk.token_ids)
    if chunk.finish_reason is not None:
        fields[FINISH_REASON] = chunk.finish_reason.value.encode()
    if chunk.usage is not None:
        usage = chunk.usage
        fields[USAGE] = f"{usage.prompt_tokens},{usage.completion_tokens},{usage.cached_tokens}".encode()
    if chunk.error:
        fields[ERROR] = chunk.error.encode()
    if chunk.logprobs:
        fields[LOGPROBS] = struct.pack(f"<{len(chunk.logprobs)}f", *chunk.logprobs)
    fields.update(encode_top_logprobs(chunk.top_logprobs, with_text=False))
    return fields


def decode_chunk(request_id: str, fields: RawFields) -> TokenChunk:
    try:
        return TokenChunk(request_id, *_chunk_parts(fields))
    except InvalidParameterError:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise InvalidParameterError("output entry", sorted(fields), f"cannot decode: {exc}") from exc


# Every streamed token is decoded at least twice (detokenizer, ingress), so the readers look up
# fields by their byte names, made once, and skip the optional ones an entry does not carry.
_START_KEY, _TOKENS_KEY, _FINISH_KEY = START_INDEX.encode(), TOKEN_IDS.encode(), FINISH_REASON.encode()
_USAGE_KEY, _ERROR_KEY, _LOGPROBS_KEY = USAGE.encode(), ERROR.encode(), LOGPROBS.encode()
_TEXT_KEY, _MATCHED_KEY, _PIECES_KEY = TEXT.encode(), MATCHED_STOP.encode(), PIECES.encode()
_FINISH_REASONS = {reason.value.encode(): reason for reason in FinishReason}

_ChunkParts = tuple[
    int, tuple[int, ...], FinishReason | None, Usage | None, str, tuple[float, ...], TopLogprobs
]


def _chunk_parts(fields: RawFields) -> _ChunkParts:
    """A chunk entry's fields in ``TokenChunk``'s order after the request id."""
    get = fields.get
    start, packed, finish = get(_START_KEY), get(_TOKENS_KEY), get(_FINISH_KEY)
    usage, error, logprobs = get(_USAGE_KEY), get(_ERROR_KEY), get(_LOGPROBS_KEY)
    if start is None:
        raise KeyError(f"missing field {START_INDEX!r}")
    return (
        int(start),
        unpack_token_ids(TOKEN_IDS, packed) if packed else (),
        (_FINISH_REASONS.get(finish) or FinishReason(finish.decode())) if finish else None,
        Usage(*(int(part) for part in usage.split(b","))) if usage else None,
        error.decode(errors="replace") if error else "",
        struct.unpack(f"<{len(logprobs) // 4}f", logprobs) if logprobs else (),
        decode_top_logprobs(fields),
    )


def encode_text_delta(delta: TextDelta) -> Fields:
    """A text stream entry: the chunk fields of the tokens it renders, plus their text."""
    chunk = TokenChunk(
        delta.request_id,
        delta.token_index,
        delta.token_ids,
        delta.finish_reason,
        delta.usage,
        delta.error,
        delta.logprobs,
    )
    fields = encode_chunk(chunk)
    fields.update(encode_top_logprobs(delta.top_logprobs, with_text=True))
    if delta.text:
        fields[TEXT] = delta.text.encode()
    if delta.matched_stop:
        fields[MATCHED_STOP] = delta.matched_stop.encode()
    if len(delta.pieces) > 1:
        fields[PIECES] = pack_token_ids("pieces", [n for size in delta.pieces for n in size])
    return fields


def decode_text_delta(request_id: str, fields: RawFields) -> TextDelta:
    try:
        start, token_ids, finish, usage, error, logprobs, top_logprobs = _chunk_parts(fields)
        text, matched, pieces = fields.get(_TEXT_KEY), fields.get(_MATCHED_KEY), fields.get(_PIECES_KEY)
        flat = unpack_token_ids(PIECES, pieces) if pieces else ()
        return TextDelta(
            request_id=request_id,
            text=text.decode() if text else "",
            token_ids=token_ids,
            token_index=start,
            finish_reason=finish,
            matched_stop=matched.decode() if matched else "",
            usage=usage,
            error=error,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            pieces=tuple(zip(flat[::2], flat[1::2], strict=True)),
        )
    except InvalidParameterError:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as exc:  # UnicodeDecodeError included
        raise InvalidParameterError("text entry", sorted(fields), f"cannot decode: {exc}") from exc


def streams_by_key(reply: Any) -> dict[str, list[tuple[str, RawFields]]]:
    """Entries of a multi-stream XREAD reply, by stream key."""
    return {
        as_text(key): [(as_text(entry_id), fields) for entry_id, fields in entries if fields is not None]
        for key, entries in reply or ()
    }


def decode_chunk_entries(
    request_id: str, entries: Iterable[tuple[Any, Any]] | None
) -> list[tuple[str, TokenChunk]]:
    """Output stream entries (as XRANGE, or ``stream_entries`` of an XREAD, returns them) decoded."""
    return [
        (as_text(entry_id), decode_chunk(request_id, fields))
        for entry_id, fields in entries or ()
        if fields is not None
    ]


def stream_entries(reply: Any) -> list[tuple[str, RawFields]]:
    """Entries of an XREAD/XREADGROUP reply (RESP2 shape: ``[[stream, [(id, fields), ...]], ...]``)."""
    return [
        (as_text(entry_id), fields)
        for _stream, entries in reply or ()
        for entry_id, fields in entries
        if fields is not None  # an entry deleted while pending has no fields
    ]


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def flatten(fields: Fields) -> list[bytes | str]:
    """Field/value pairs as one flat argument list, the form Lua scripts receive."""
    flat: list[bytes | str] = []
    for name, value in fields.items():
        flat.extend((name, value))
    return flat


def pairs_to_fields(flat: Iterable[bytes]) -> dict[bytes, bytes]:
    """A flat field/value array, as a Lua script returns an entry, back into a mapping."""
    items = list(flat)
    return dict(zip(items[::2], items[1::2], strict=True))


def _required(fields: RawFields, name: str) -> bytes:
    value = fields.get(name.encode())
    if value is None:
        raise KeyError(f"missing field {name!r}")
    return value


def encode_stream_request(request: GenerationRequest) -> bytes:
    """What a reader needs to follow a request's output: small, unlike the request itself."""
    return json.dumps(
        {
            "model": request.model,
            "prompt_tokens": len(request.prompt_token_ids),
            "stop": list(request.params.stop),
        }
    ).encode()


def decode_stream_request(request_id: str, blob: bytes | str) -> StreamRequest:
    data = json.loads(blob)
    return StreamRequest(request_id, str(data["model"]), int(data["prompt_tokens"]), tuple(data["stop"]))
