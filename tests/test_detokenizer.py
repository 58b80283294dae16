"""Incremental detokenization and stop strings on a real byte-level BPE tokenizer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from services.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.errors import InvalidParameterError
from services.tokenizer.tokenizer import PromptTokenizer
from tests.bpe_tokenizer import VOCAB_SIZE, byte_token_id, train_byte_level_bpe, write_bpe_checkpoint
from tests.recording_decoder import RecordingDecoder

REPLACEMENT = "\ufffd"
# Pieces that byte-level BPE splits across tokens: CJK, ZWJ sequences, flags,
# skin tones, combining marks, astral-plane letters, and plain ASCII around them.
FRAGMENTS = (
    "今天",
    "天气很好",
    "。",
    "日本語",
    "👨\u200d👩\u200d👧\u200d👦",
    "🧑\u200d💻",
    "🏳️\u200d🌈",
    "🇯🇵",
    "🇫🇷🇧🇷",
    "👍🏽",
    "😀",
    "e\u0301",
    "Zürich",
    "crème",
    "Привет",
    "مرحبا",
    "नमस्ते",
    "𝔘𝔫𝔦",  # noqa: RUF001  (astral-plane letters on purpose)
    " ",
    "\n",
    "the ",
    "fox",
)
TEXTS = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=st.characters(codec="utf-8"), max_size=4)),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bpe_checkpoint(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> PromptTokenizer:
    return PromptTokenizer(checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)


def _stream(detokenizer: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    return [detokenizer.push(chunk) for chunk in chunks] + [detokenizer.finish()]


def _split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = [0, *sorted({cut % (len(ids) + 1) for cut in cuts}), len(ids)]
    return [ids[start:end] for start, end in itertools.pairwise(bounds)]


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_one_token_at_a_time_reproduces_the_one_shot_decode(
    tokenizer: PromptTokenizer, hf_tokenizer: Any, text: str
) -> None:
    ids = tokenizer.encode_text(text or " ")
    deltas = _stream(IncrementalDetokenizer(tokenizer), [[token] for token in ids])
    expected = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in delta for delta in deltas)


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=64), max_size=10))
def test_random_chunks_reproduce_the_one_shot_decode(
    tokenizer: PromptTokenizer, hf_tokenizer: Any, text: str, cuts: list[int]
) -> None:
    ids = tokenizer.encode_text(text or " ")
    deltas = _stream(IncrementalDetokenizer(tokenizer), _split(ids, cuts))
    expected = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in delta for delta in deltas)


@settings(max_examples=80, deadline=None)
@given(
    ids=st.lists(st.integers(min_value=0, max_value=VOCAB_SIZE - 1), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_arbitrary_ids_including_invalid_bytes_reproduce_the_one_shot_decode(
    tokenizer: PromptTokenizer, hf_tokenizer: Any, ids: list[int], cuts: list[int]
) -> None:
    # Models emit any id: special tokens, stray continuation bytes, unfinished characters.
    deltas = _stream(IncrementalDetokenizer(tokenizer), _split(ids, cuts))
    assert "".join(deltas) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_split_character_is_held_until_complete_and_flushed_at_finish(tokenizer: PromptTokenizer) -> None:
    backend = train_byte_level_bpe()
    lead, middle, last = (byte_token_id(backend, byte) for byte in "中".encode())
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push([lead]) == ""
    assert detokenizer.push([middle]) == ""
    assert detokenizer.push([last]) == "中"
    unfinished = IncrementalDetokenizer(tokenizer)
    assert unfinished.push([lead, middle]) == ""
    assert unfinished.finish() == REPLACEMENT


def test_degenerate_bytes_keep_the_window_bounded(tokenizer: PromptTokenizer) -> None:
    backend = train_byte_level_bpe()
    lead, middle, last = (byte_token_id(backend, byte) for byte in "中".encode())
    # Each lead byte is cut short by the next one: the text ends in U+FFFD at every step.
    ids = [lead] * 200 + [middle, last]
    recorder = RecordingDecoder(tokenizer)
    deltas = _stream(IncrementalDetokenizer(recorder), [[token] for token in ids])
    # The last lead byte starts the completed character; the 199 before it stay invalid.
    assert "".join(deltas) == tokenizer.decode(ids) == REPLACEMENT * 199 + "中"
    assert max(recorder.window_sizes) <= 16


def test_cost_per_token_does_not_grow_with_the_output(tokenizer: PromptTokenizer) -> None:
    sentence = tokenizer.encode_text(
        "今天天气很好 👨\u200d👩\u200d👧\u200d👦 crème 🇯🇵 ", add_special_tokens=False
    )
    ids = sentence * 200  # longer than the context on purpose: the detokenizer does not care
    recorder = RecordingDecoder(tokenizer)
    detokenizer = IncrementalDetokenizer(recorder)
    text = "".join(detokenizer.push([token]) for token in ids) + detokenizer.finish()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 1000
    assert max(recorder.window_sizes) <= 12
    assert sum(recorder.window_sizes) <= 12 * len(ids)


# --- stop strings -------------------------------------------------------------------------

STOP_ALPHABET = "ab中😀"


def _reference_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Check after every character; the first stop string to complete wins, the longer
    on a tie (it starts earlier)."""
    for end in range(1, len(text) + 1):
        completed = [stop for stop in stops if text[:end].endswith(stop)]
        if completed:
            stop = max(completed, key=len)
            return text[: end - len(stop)], stop
    return text, None


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=STOP_ALPHABET, max_size=30),
    stops=st.lists(st.text(alphabet=STOP_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=10),
)
def test_stop_strings_never_leak_across_delta_boundaries(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    expected_text, expected_stop = _reference_stop(text, stops)
    matcher = StopStringMatcher(stops)
    sent, matched = "", None
    for delta in (text[a:b] for a, b in _character_spans(text, cuts)):
        safe, stop = matcher.push(delta)
        sent += safe
        matched = matched or stop
        assert expected_text.startswith(sent)  # nothing beyond the cut point was ever sent
    sent += matcher.finish()
    assert (sent, matched) == (expected_text, expected_stop)
    assert matcher.matched == expected_stop


def _character_spans(text: str, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *sorted({cut % (len(text) + 1) for cut in cuts}), len(text)]
    return list(itertools.pairwise(bounds))


def test_partial_stop_is_held_back_and_released_when_it_diverges() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abcST") == ("abc", None)
    assert matcher.held_back == "ST"
    assert matcher.push("x") == ("STx", None)
    assert matcher.push("...S") == ("...", None)
    assert matcher.finish() == "S"


def test_stop_spanning_deltas_is_cut_and_later_text_swallowed() -> None:
    matcher = StopStringMatcher(["\n\nUser:", "###"])
    assert matcher.push("Answer: 42\n") == ("Answer: 42", None)
    assert matcher.push("\nUs") == ("", None)
    assert matcher.push("er: more") == ("", "\n\nUser:")
    assert matcher.push("tokens the engine already made") == ("", None)
    assert matcher.finish() == ""
    assert matcher.matched == "\n\nUser:"


def test_no_stops_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", None)
    assert matcher.finish() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(InvalidParameterError) as error:
        StopStringMatcher(["ok", ""])
    assert error.value.field == "stop"


def test_detokenizer_and_stop_matcher_cut_a_stop_split_across_tokens(tokenizer: PromptTokenizer) -> None:
    ids = tokenizer.encode_text("Family 👨\u200d👩\u200d👧\u200d👦 then 今天天气很好 and more")
    stop = "\u200d👧"  # starts and ends inside tokens of the ZWJ sequence
    detokenizer, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher([stop])
    sent, matched = "", None
    for token in ids:
        safe, matched = matcher.push(detokenizer.push([token]))
        sent += safe
        assert stop not in sent
        if matched:
            break
    assert matched == stop
    assert sent == "Family 👨\u200d👩"
