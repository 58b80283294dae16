"""Top-N alternatives per token on their way from the engine to the client, piece by piece:
the stream entry codec, the cuts a resume or an overlapping writer makes, the detokenizer that
names each alternative, the engine's sampler. The whole path over a real stack is in
tests/test_logprobs_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.detokenizer.follower import RequestText
from services.engine import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.errors import InvalidParameterError
from services.ingress.convert import stream_response
from services.messages import (
    FinishReason,
    StreamRequest,
    TextDelta,
    TokenChunk,
    TopLogprob,
    merge_text_deltas,
)
from services.queue import codec
from services.queue.output_stream import OutputCursor, advance
from services.tokenizer.tokenizer import PromptTokenizer


def alternatives(*pairs: tuple[int, float], text: bool = False) -> tuple[TopLogprob, ...]:
    return tuple(
        TopLogprob(token_id, logprob, f"<{token_id}>" if text else "") for token_id, logprob in pairs
    )


TOP = (
    alternatives((7, -0.5), (3, -1.5)),
    alternatives((9, -0.25), (7, -2.0)),
    alternatives((4, -0.75), (1, -3.0)),
)


def test_a_chunk_without_alternatives_writes_no_extra_field() -> None:
    plain = codec.encode_chunk(TokenChunk("r", 0, (7, 9), logprobs=(-0.5, -0.25)))
    assert set(plain) == {codec.START_INDEX, codec.TOKEN_IDS, codec.LOGPROBS}
    text = codec.encode_text_delta(TextDelta("r", text="ab", token_ids=(7, 9)))
    assert set(text) == {codec.START_INDEX, codec.TOKEN_IDS, codec.TEXT}


def test_chunk_and_text_entries_carry_alternatives_exactly() -> None:
    chunk = TokenChunk("r", 4, (7, 9, 4), logprobs=(-0.5, -0.25, -0.75), top_logprobs=TOP)
    assert codec.decode_chunk("r", _as_raw(codec.encode_chunk(chunk))) == chunk
    named = (
        (TopLogprob(7, -0.5, " the"), TopLogprob(3, -1.5, "")),  # a special token decodes to nothing
        alternatives((9, -0.25), (7, -2.0), text=True),
        (TopLogprob(4, -0.75, '€\ufffd,"\\'),),  # any text survives, and counts may differ per token
    )
    delta = TextDelta(
        "r", text="x", token_ids=(7, 9, 4), token_index=4, logprobs=chunk.logprobs, top_logprobs=named
    )
    assert codec.decode_text_delta("r", _as_raw(codec.encode_text_delta(delta))) == delta


def test_alternatives_that_disagree_with_their_counts_are_refused() -> None:
    fields = codec.encode_chunk(TokenChunk("r", 0, (7, 9, 4), top_logprobs=TOP))
    fields["n"] = fields["n"][:-4]  # one token fewer than the alternatives packed
    with pytest.raises(InvalidParameterError) as error:
        codec.decode_chunk("r", _as_raw(fields))
    assert error.value.field == "top_logprobs"


def test_an_overlapping_writer_keeps_alternatives_with_their_tokens() -> None:
    first = TokenChunk("r", 0, (7, 9), logprobs=(-0.5, -0.25), top_logprobs=TOP[:2])
    again = TokenChunk("r", 1, (9, 4), logprobs=(-0.25, -0.75), top_logprobs=TOP[1:])
    chunks, cursor = advance(OutputCursor("r"), [("1-0", first), ("2-0", again)])
    assert [c.token_ids for c in chunks] == [(7, 9), (4,)]
    assert chunks[1].top_logprobs == TOP[2:] and chunks[1].logprobs == (-0.75,)
    assert cursor.next_index == 3


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_a_resume_inside_a_merged_delta_cuts_alternatives_at_the_same_token(index: int) -> None:
    pieces = [
        TextDelta(
            "r",
            text=text,
            token_ids=(token,),
            token_index=i,
            logprobs=(TOP[i][0].logprob,),
            top_logprobs=(TOP[i],),
        )
        for i, (token, text) in enumerate([(7, "a"), (9, ""), (4, "bc")])
    ]
    merged = merge_text_deltas(pieces)
    assert merged.top_logprobs == TOP and len(merged.logprobs) == 3
    cut = merged.from_token(index)
    if index == 3:
        assert cut is None  # nothing left, and it was not the last delta
        return
    assert cut is not None and cut.token_ids == (7, 9, 4)[index:]
    assert cut.top_logprobs == TOP[index:] and cut.logprobs == merged.logprobs[index:]
    message = stream_response(cut)
    assert [[a.token_id for a in top.alternatives] for top in message.top_logprobs] == [
        [a.token_id for a in top] for top in TOP[index:]
    ]


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(demo_model_dir)


def test_detokenizer_names_each_alternative_by_its_text_alone(tokenizer: PromptTokenizer) -> None:
    ids = tokenizer.encode_text("12+35= 47", add_special_tokens=False)
    eos = tokenizer.eos_token_ids[0]
    top = tuple((TopLogprob(token, -0.1), TopLogprob(eos, -2.5)) for token in ids)
    chunks = [
        TokenChunk("r", 0, tuple(ids[:2]), top_logprobs=top[:2]),
        TokenChunk("r", 2, tuple(ids[2:]), finish_reason=FinishReason.LENGTH, top_logprobs=top[2:]),
    ]
    resumed_at = 3
    text = RequestText(tokenizer, StreamRequest("r", "demo", 4), from_token=resumed_at)
    delta = text.render(chunks)
    assert delta is not None and delta.token_ids == tuple(ids[resumed_at:])
    assert [[a.token_id for a in alts] for alts in delta.top_logprobs] == [[t, eos] for t in ids[resumed_at:]]
    for alts in delta.top_logprobs:
        assert alts[0].text == tokenizer.decode([alts[0].token_id]) != ""
        assert alts[1].text == ""  # end-of-sequence is a special token: skipped when decoded


def test_sampler_gives_sorted_distinct_alternatives_led_by_the_greedy_token(demo_model_dir: Path) -> None:
    engine = Engine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=32))
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True)
    out = engine.generate([[1, 40, 41, 42]], params)[0]
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        ids, values = [t for t, _ in entry.top], [v for _, v in entry.top]
        assert len(set(ids)) == 5 and values == sorted(values, reverse=True)
        assert ids[0] == token and values[0] == entry.logprob


def _as_raw(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    """Fields as Redis hands them back."""
    return {name.encode(): value for name, value in fields.items()}
