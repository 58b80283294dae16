"""Calls on the Generation service for the bad-input tests: typed ones through the project's
client, and raw ones whose request bytes are made by hand (invalid UTF-8, corrupt wire
format, unknown fields), as a hostile or buggy client could send them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from google.protobuf.message import Message

from services.client import TokenlineClient
from services.proto.tokenline.v1 import generation_pb2 as pb

RPCS = ("Generate", "GenerateStream", "Tokenize", "Cancel", "ListModels", "Resume")
REQUEST_TYPES: dict[str, type[Message]] = {
    "Generate": pb.GenerateRequest,
    "GenerateStream": pb.GenerateRequest,
    "Tokenize": pb.TokenizeRequest,
    "Cancel": pb.CancelRequest,
    "ListModels": pb.ListModelsRequest,
    "Resume": pb.ResumeRequest,
}
_STREAMING = frozenset({"GenerateStream", "Resume"})
_SERVICE = "/tokenline.v1.Generation/"
TIMEOUT_S = 60.0

Metadata = Sequence[tuple[str, str]]


def call_raw(channel: grpc.Channel, rpc: str, payload: bytes, metadata: Metadata) -> list[bytes]:
    """Send ``payload`` as the request of ``rpc`` without serializing it; the raw responses."""
    path = _SERVICE + rpc
    if rpc in _STREAMING:
        return list(channel.unary_stream(path)(payload, metadata=metadata, timeout=TIMEOUT_S))
    response: bytes = channel.unary_unary(path)(payload, metadata=metadata, timeout=TIMEOUT_S)
    return [response]


def call_typed(client: TokenlineClient, rpc: str, message: object) -> object:
    """Run ``rpc`` with a request message built by the caller; streams are drained."""
    if rpc == "Generate":
        assert isinstance(message, pb.GenerateRequest)
        return client.generate(message, timeout_s=TIMEOUT_S)
    if rpc == "GenerateStream":
        assert isinstance(message, pb.GenerateRequest)
        return list(client.stream(message, timeout_s=TIMEOUT_S))
    if rpc == "Tokenize":
        assert isinstance(message, pb.TokenizeRequest)
        return client.tokenize(message, timeout_s=TIMEOUT_S)
    if rpc == "Cancel":
        assert isinstance(message, pb.CancelRequest)
        return client.cancel(message.request_id, message.model, timeout_s=TIMEOUT_S)
    if rpc == "Resume":
        assert isinstance(message, pb.ResumeRequest)
        return list(client.resume(message.request_id, message.from_token, timeout_s=TIMEOUT_S))
    raise ValueError(f"no typed call for {rpc}")


def error_of(call: Callable[[], object]) -> grpc.RpcError:
    """The status a call ends with; a call that succeeds fails the test."""
    try:
        result = call()
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"expected an error status, got a response: {str(result)[:200]}")


def assert_invalid_argument(error: grpc.RpcError, field: str) -> None:
    """INVALID_ARGUMENT whose details start with the field, as the proto promises
    (``sampling.top_p: must be in (0, 1] ...``)."""
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {details[:300]}"
    assert details.startswith(f"{field}:"), f"details must name {field!r}: {details[:300]}"


def auth(api_key: str) -> Metadata:
    return (("authorization", f"Bearer {api_key}"),)


def with_bytes_in_place_of(build: Callable[[str], object], raw: bytes) -> bytes:
    """The request with ``raw`` where a string field goes: protobuf will not serialize invalid
    UTF-8, so an ASCII marker of the same length is serialized and swapped for the bytes."""
    marker = "MARK" + "~" * (len(raw) - 4)
    message = build(marker)
    serialized: bytes = message.SerializeToString()  # type: ignore[attr-defined]
    assert serialized.count(marker.encode()) == 1
    return serialized.replace(marker.encode(), raw)


def oversized(rpc: str, filler: str, size: int) -> bytes:
    """A request of ``rpc`` of at least ``size`` bytes, the bulk in the field ``filler`` names;
    "unknown" is a field no request has, which a parser would skip: only the size is wrong."""
    if filler == "unknown":  # field 1000, wire type 2 (length-delimited)
        return encode_varint(1000 << 3 | 2) + encode_varint(size) + b"\0" * size
    bulk = "7" * size
    builders: dict[str, Callable[[], object]] = {
        "text": lambda: pb.TokenizeRequest(text=bulk) if rpc == "Tokenize" else pb.GenerateRequest(text=bulk),
        "token_ids": lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * size)),
        "chat": lambda: pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=bulk)])
        ),
        "stop": lambda: pb.GenerateRequest(
            text="1+2=", sampling=pb.SamplingParams(stop=["7" * 200] * (size // 200))
        ),
        "request_id": lambda: (
            pb.ResumeRequest(request_id=bulk) if rpc == "Resume" else pb.CancelRequest(request_id=bulk)
        ),
    }
    serialized: bytes = builders[filler]().SerializeToString()  # type: ignore[attr-defined]
    return serialized


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
