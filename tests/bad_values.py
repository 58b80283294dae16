"""Hypothesis strategies for bad (and extreme but valid) request values, with the field each
error must name. The tests that send them live in test_bad_input.py."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from hypothesis import example
from hypothesis import strategies as st

from services.messages import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from services.proto.tokenline.v1 import generation_pb2 as pb
from services.tokenizer import KNOWN_CHAT_ROLES
from tests.raw_grpc import REQUEST_TYPES, RPCS

NAN, INF = math.nan, math.inf
F32_TINY = 1.401298464324817e-45  # the smallest positive float32: proto floats are 32-bit
F32_ABOVE_ONE = 1.0000001192092896  # the float32 right after 1
F32_MAX = 3.4028234663852886e38
INT32_MIN, UINT32_MAX = -(2**31), 2**32 - 1


# ---- sampling parameters ------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """A bad value for one field of SamplingParams, and the field the error must name."""

    attribute: str
    value: object

    @property
    def field(self) -> str:
        return f"sampling.{self.attribute}"

    def apply(self, request: pb.GenerateRequest) -> pb.GenerateRequest:
        if isinstance(self.value, list):
            getattr(request.sampling, self.attribute).extend(self.value)
        else:
            setattr(request.sampling, self.attribute, self.value)
        return request

    def __repr__(self) -> str:  # thousands of stop strings would flood a failure report
        shown = f"[{len(self.value)} items]" if isinstance(self.value, list) else repr(self.value)
        return f"Bad({self.attribute}={shown})"


def f32(**bounds: float | bool) -> st.SearchStrategy[float]:
    return st.floats(width=32, **bounds)  # type: ignore[arg-type]


def bad(attribute: str, values: st.SearchStrategy[object]) -> st.SearchStrategy[Bad]:
    return values.map(lambda value: Bad(attribute, value))


def many(item: st.SearchStrategy[object], low: int, high: int) -> st.SearchStrategy[object]:
    """A list of ``low..high`` items, sized by one draw (hypothesis' own buffer cannot hold
    thousands of separately drawn items)."""
    return st.builds(lambda x, n: [x] * n, item, st.integers(low, high))


NEGATIVE = f32(max_value=-F32_TINY)  # includes -inf; -0.0 would be a valid 0
BAD_SAMPLING = st.one_of(
    bad("temperature", NEGATIVE | st.sampled_from([NAN, INF])),
    bad("top_p", f32(max_value=0.0) | f32(min_value=1.0, exclude_min=True) | st.just(NAN)),
    bad("min_p", NEGATIVE | f32(min_value=1.0, exclude_min=True) | st.just(NAN)),
    *(
        bad(name, f32(min_value=2.0, exclude_min=True) | f32(max_value=-2.0, exclude_max=True) | st.just(NAN))
        for name in ("presence_penalty", "frequency_penalty")
    ),
    bad("repetition_penalty", f32(max_value=0.0) | st.sampled_from([NAN, INF])),
    bad("top_k", st.integers(INT32_MIN, -2) | st.just(0)),
    bad("max_tokens", st.just(0) | st.integers(2**31, UINT32_MAX)),
    bad("seed", st.integers(2**63, 2**64 - 1)),
    bad("logprobs", st.integers(MAX_LOGPROBS + 1, UINT32_MAX)),
    bad("stop", many(st.text(min_size=1, max_size=8), MAX_STOP_STRINGS + 1, 5000)),
    bad(
        "stop",
        st.builds(
            lambda s, n: [(s * n)[:n]],
            st.text(min_size=1, max_size=3),
            st.integers(MAX_STOP_STRING_CHARS + 1, 20000),
        ),
    ),
    bad("stop", st.just([""])),
    bad("stop_token_ids", many(st.integers(0, UINT32_MAX), MAX_STOP_TOKEN_IDS + 1, 5000)),
)
EDGE_CASES = [
    *(Bad("temperature", v) for v in (NAN, INF, -INF, -1.0, -F32_TINY)),
    *(Bad("top_p", v) for v in (0.0, -0.0, NAN, F32_ABOVE_ONE, INF)),
    Bad("top_k", -2),
    Bad("top_k", 0),
    *(Bad("max_tokens", v) for v in (0, 2**31, UINT32_MAX)),
    Bad("min_p", F32_ABOVE_ONE),
    Bad("repetition_penalty", 0.0),
    Bad("presence_penalty", 2.0000002384185791),
    Bad("seed", 2**63),
    Bad("logprobs", MAX_LOGPROBS + 1),
    Bad("stop", [f"s{i}" for i in range(5000)]),  # thousands of stop strings
    Bad("stop", ["x" * (MAX_STOP_STRING_CHARS + 1)]),
]


def with_examples(cases: list[Bad]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        for case in cases:
            test = example(case=case, rpc="Generate")(test)
        return test

    return decorate


VALID_SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "temperature": f32(min_value=0.0, max_value=F32_MAX) | st.sampled_from([0.0, F32_TINY]),
        "top_p": f32(min_value=F32_TINY, max_value=1.0),
        "top_k": st.sampled_from([-1, 1, 2**31 - 1]) | st.integers(1, 2000),
        "min_p": f32(min_value=0.0, max_value=1.0),
        "seed": st.sampled_from([0, 2**63 - 1]) | st.integers(0, 2**63 - 1),
        "presence_penalty": f32(min_value=-2.0, max_value=2.0),
        "frequency_penalty": f32(min_value=-2.0, max_value=2.0),
        "repetition_penalty": f32(min_value=F32_TINY, max_value=F32_MAX),
        "logprobs": st.integers(0, MAX_LOGPROBS),
        "max_tokens": st.integers(1, 6),
        "ignore_eos": st.booleans(),
    },
)


# ---- prompts --------------------------------------------------------------------------------
PromptSetter = Callable[[pb.GenerateRequest | pb.TokenizeRequest], None]


def text_prompt(text: str) -> PromptSetter:
    return lambda message: setattr(message, "text", text)


def chat_prompt(*messages: tuple[str, str]) -> PromptSetter:
    def set_chat(message: pb.GenerateRequest | pb.TokenizeRequest) -> None:
        message.chat.SetInParent()  # an empty chat is still a chosen prompt
        message.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)

    return set_chat


UNKNOWN_ROLE = st.text(max_size=20).filter(lambda role: role not in KNOWN_CHAT_ROLES)
TOO_LONG_TEXT = st.integers(1024, 300_000).map(lambda n: "7 " * n)  # 2 tokens per "7 "; context 2048
BAD_PROMPTS = st.one_of(
    st.just(("prompt", lambda m: None)),
    st.just(("prompt.text", text_prompt(""))),
    st.just(("prompt.chat", chat_prompt())),
    UNKNOWN_ROLE.map(lambda role: ("prompt.chat", chat_prompt(("user", "hi"), (role, "hi")))),
    st.just(("prompt", chat_prompt(("user", "")))),
    TOO_LONG_TEXT.map(lambda text: ("prompt", text_prompt(text))),
    TOO_LONG_TEXT.map(lambda text: ("prompt", chat_prompt(("user", text)))),
)


@st.composite
def bad_token_ids(draw: st.DrawFn, vocab_size: int) -> tuple[str, list[int]]:
    kind = draw(st.sampled_from(["outside", "too many", "none"]))
    if kind == "none":
        return "prompt.token_ids", []
    if kind == "too many":
        return "prompt", [draw(st.integers(0, vocab_size - 1))] * draw(st.integers(2048, 200_000))
    ids = draw(st.lists(st.integers(0, vocab_size - 1), max_size=20))
    ids.insert(draw(st.integers(0, len(ids))), draw(st.integers(vocab_size, UINT32_MAX)))
    return "prompt.token_ids", ids


# ---- request ids ----------------------------------------------------------------------------
ALLOWED_ID = re.compile(r"[A-Za-z0-9_.:-]+")


def bad_request_ids(max_len: int) -> st.SearchStrategy[str]:
    """Ids with a character outside the allowed set, or too long (129..max_len characters)."""
    bad_characters = st.text(min_size=1, max_size=40).filter(lambda s: not ALLOWED_ID.fullmatch(s))
    piece = st.from_regex(ALLOWED_ID, fullmatch=True)
    too_long = st.builds(lambda p, n: (p * n)[:n], piece, st.integers(129, max_len))
    return bad_characters | too_long


BAD_REQUEST_IDS = bad_request_ids(1_000_000)


# ---- bytes that are not a valid request -----------------------------------------------------
INVALID_UTF8 = st.sampled_from(
    [
        b"\xff",
        b"\xc0\x80",
        b"\x80",
        b"\xe2\x82",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80",
    ]
)
# Each string field of each RPC: a builder of the request that holds the given string there.
STRING_FIELDS: list[tuple[str, Callable[[str], object]]] = [
    ("Generate", lambda s: pb.GenerateRequest(text=s)),
    ("Generate", lambda s: pb.GenerateRequest(text="1+2=", request_id=s)),
    ("GenerateStream", lambda s: pb.GenerateRequest(text="1+2=", model=s)),
    (
        "GenerateStream",
        lambda s: pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=s)])),
    ),
    ("Generate", lambda s: pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role=s, content="hi")]))),
    ("GenerateStream", lambda s: pb.GenerateRequest(text="1+2=", sampling=pb.SamplingParams(stop=[s]))),
    ("Tokenize", lambda s: pb.TokenizeRequest(text=s)),
    ("Tokenize", lambda s: pb.TokenizeRequest(text="1+2=", model=s)),
    ("Cancel", lambda s: pb.CancelRequest(request_id=s)),
    ("Cancel", lambda s: pb.CancelRequest(request_id="someone", model=s)),
    ("Resume", lambda s: pb.ResumeRequest(request_id=s)),
]


def does_not_parse(rpc: str, payload: bytes) -> bool:
    try:
        REQUEST_TYPES[rpc].FromString(payload)
    except DecodeError:
        return True
    return False


@st.composite
def corrupt_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """An RPC and bytes that do not parse as its request message."""
    rpc = draw(st.sampled_from(RPCS))
    return rpc, draw(st.binary(min_size=1, max_size=64).filter(lambda b: does_not_parse(rpc, b)))
