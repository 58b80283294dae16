"""Incremental detokenization against the real tokenizer of every supported family.

Llama 3 and Qwen3 (byte-level BPE), Mistral-7B (SentencePiece with byte fallback:
a run of ``<0xNN>`` tokens decodes as a whole) and the demo model. The ids arrive in
chunks, as the detokenizer stage reads them under load; whatever the chunking, the
deltas must concatenate to the one-shot decode, every prefix of the stream must be
a prefix of it (so no U+FFFD it does not have), and text that can no longer change
must not be held back. The tokenizer files come from ``make tokenizers``
(tests/real_tokenizers.py); a missing one fails the test.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from services.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenDecoder
from services.errors import InvalidParameterError
from services.tokenizer.decoding import TOKENIZER_FILE, TextDecoder
from services.tokenizer.tokenizer import PromptTokenizer
from tests.real_tokenizers import cached_tokenizer
from tests.recording_decoder import RecordingDecoder

REPLACEMENT = "\ufffd"
FAMILIES = ("llama3", "qwen3", "mistral", "demo")
# Mistral-7B splits this Chinese word into byte tokens; fed in chunks of four, the
# detokenizer used to emit U+FFFD inside it.
CHINESE = "我们今天去公园散步，天气很好。鬱龘齉"  # noqa: RUF001  (a fullwidth comma on purpose)
MULTILINGUAL = (
    CHINESE,
    "日本語のテキストを書きます。カタカナ、ひらがな。",
    "Emoji: 😀👍🏽 👨\u200d👩\u200d👧\u200d👦 🧑\u200d💻 🏳️\u200d🌈 🇯🇵🇫🇷",
    "Accents: crème brûlée, Zürich, e\u0301, Ångström, São Paulo",
    "Привет, мир! مرحبا بالعالم नमस्ते 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # noqa: RUF001  (astral-plane letters on purpose)
    "def f(x):\n    return {'a': x ** 2}  # comment\n\tif x:\n\t\tpass\n",
    "whitespace   runs\n\n\n    and\t\ttabs  \r\n  trailing   ",
    "  leading spaces, then ▁ the SentencePiece marker and <0xE4> as plain text",
)
FRAGMENTS = (*itertools.chain.from_iterable(text.split(" ") for text in MULTILINGUAL), " ", "  ", "\n")
TEXTS = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=st.characters(codec="utf-8"), max_size=4)),
    min_size=1,
    max_size=10,
).map(" ".join)
FAMILY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Family:
    """One tokenizer: the decoder under test, its encoder, and ids worth mixing in."""

    def __init__(self, name: str, tokenizer_json: Path, decoder: TokenDecoder) -> None:
        self.name = name
        self.decoder = decoder
        self.backend = Tokenizer.from_file(str(tokenizer_json))
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        # Ids that stress the detokenizer: single bytes (byte-level alphabet or <0xNN>),
        # special and other added tokens, and whitespace-only pieces.
        self.tricky_ids = sorted(
            {token_id for token, token_id in vocab.items() if len(token) == 1}
            | set(decoder.byte_fallback_values)
            | set(self.backend.get_added_tokens_decoder())
            | {token_id for token, token_id in vocab.items() if token and set(token) <= set("▁Ġ Ċ\n\t")}
        )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return ids


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> Family:
    name: str = request.param
    if name == "demo":
        checkpoint: Path = request.getfixturevalue("demo_model_dir")
        return Family(name, checkpoint / "tokenizer.json", PromptTokenizer(checkpoint))
    path = cached_tokenizer(name)
    return Family(name, path, TextDecoder.from_file(path))


def _stream(decoder: TokenDecoder, chunks: Sequence[Sequence[int]]) -> list[str]:
    detokenizer = IncrementalDetokenizer(decoder)
    return [detokenizer.push(chunk) for chunk in chunks] + [detokenizer.finish()]


def _check_exact(family: Family, ids: list[int], chunks: Sequence[Sequence[int]]) -> None:
    expected = family.decoder.decode(ids)
    sent = ""
    for delta in _stream(family.decoder, chunks):
        sent += delta
        assert expected.startswith(sent), f"{family.name}: {sent!r} is not a prefix of {expected!r}"
    assert sent == expected


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def _split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = [0, *sorted({cut % (len(ids) + 1) for cut in cuts}), len(ids)]
    return [ids[start:end] for start, end in itertools.pairwise(bounds)]


def _checkpoint_of(family: Family, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A checkpoint directory holding the family's tokenizer (the demo model is one)."""
    if family.name == "demo":
        checkpoint: Path = request.getfixturevalue("demo_model_dir")
        return checkpoint
    shutil.copy(cached_tokenizer(family.name), tmp_path / TOKENIZER_FILE)
    config = {"model_type": "llama", "max_position_embeddings": 4096, "vocab_size": family.vocab_size}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_detokenizer_decodes_the_checkpoint_as_the_tokenizer_replica_does(
    family: Family, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Detokenizer replicas read tokenizer.json without transformers (TextDecoder.from_checkpoint);
    the tokenizer replica loads the same directory through transformers (PromptTokenizer)."""
    checkpoint = _checkpoint_of(family, tmp_path, request)
    direct, served = TextDecoder.from_checkpoint(checkpoint), PromptTokenizer(checkpoint)
    assert direct.skipped_token_ids == served.skipped_token_ids
    assert direct.byte_fallback_values == served.byte_fallback_values
    sequences = [family.tricky_ids, *(family.encode(text) for text in MULTILINGUAL)]
    sequences.append(list(range(0, family.vocab_size, max(1, family.vocab_size // 3000))))
    for ids in sequences:
        assert direct.decode(ids) == served.decode(ids)


def test_a_checkpoint_without_tokenizer_json_is_refused_naming_the_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError) as raised:
        TextDecoder.from_checkpoint(tmp_path)
    assert raised.value.field == "checkpoint_dir" and "tokenizer.json" in str(raised.value)


def test_mistral_splits_the_chinese_text_into_byte_tokens(family: Family) -> None:
    # The case of the bug report must exercise byte fallback, or the next test proves little.
    if family.name != "mistral":
        assert not family.decoder.byte_fallback_values  # byte-level BPE: no byte-fallback decoder
        return
    byte_ids = family.decoder.byte_fallback_values
    assert sum(token in byte_ids for token in family.encode(CHINESE)) >= 6


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("text", MULTILINGUAL, ids=lambda text: text[:12])
def test_every_chunk_size_reproduces_the_one_shot_decode(family: Family, text: str, size: int) -> None:
    ids = family.encode(text)
    for offset in range(size):  # every alignment of the chunk boundaries
        _check_exact(family, ids, [ids[:offset], *_chunks(ids[offset:], size)])
    assert REPLACEMENT not in family.decoder.decode(ids)


@FAMILY_SETTINGS
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_random_chunks_of_random_text_reproduce_the_one_shot_decode(
    family: Family, text: str, cuts: list[int]
) -> None:
    ids = family.encode(text)
    _check_exact(family, ids, _split(ids, cuts))


@FAMILY_SETTINGS
@given(data=st.data())
def test_random_chunks_of_arbitrary_ids_reproduce_the_one_shot_decode(
    family: Family, data: st.DataObject
) -> None:
    # Models emit any id: stray and unfinished bytes, special tokens, whitespace pieces.
    any_id = st.integers(min_value=0, max_value=family.vocab_size - 1)
    tricky_id = st.sampled_from(family.tricky_ids)
    ids = data.draw(st.lists(st.one_of(tricky_id, tricky_id, any_id), max_size=40))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=40), max_size=10))
    _check_exact(family, ids, _split(ids, cuts))


def test_nothing_final_is_held_back(family: Family) -> None:
    """One id at a time, the text emitted so far is the whole decode of the ids so far
    whenever no later id can change it: for byte-level BPE, when that decode does not
    end in U+FFFD; with byte fallback, when the last id is not a byte token."""
    byte_ids = family.decoder.byte_fallback_values
    ids = family.encode(" ".join(MULTILINGUAL))
    detokenizer = IncrementalDetokenizer(family.decoder)
    sent = ""
    checked = 0
    for count, token in enumerate(ids, start=1):
        sent += detokenizer.push([token])
        so_far = family.decoder.decode(ids[:count])
        final = token not in byte_ids if byte_ids else not so_far.endswith(REPLACEMENT)
        if final:
            assert sent == so_far
            checked += 1
    assert checked > len(ids) // 2


def _reference_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Check after every character; the first stop string to complete wins, the longer
    on a tie (it starts earlier)."""
    for end in range(1, len(text) + 1):
        completed = [stop for stop in stops if text[:end].endswith(stop)]
        if completed:
            stop = max(completed, key=len)
            return text[: end - len(stop)], stop
    return text, None


@FAMILY_SETTINGS
@given(data=st.data())
def test_stop_strings_on_chunked_ids_cut_the_one_shot_text(family: Family, data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(MULTILINGUAL))
    ids = family.encode(text)
    one_shot = family.decoder.decode(ids)
    spans = st.tuples(st.integers(0, len(one_shot) - 1), st.integers(1, 4))
    stops = [
        one_shot[start : start + length]
        for start, length in data.draw(st.lists(spans, min_size=1, max_size=3))
    ]
    chunks = _split(ids, data.draw(st.lists(st.integers(min_value=0, max_value=200), max_size=12)))
    expected_text, expected_stop = _reference_stop(one_shot, stops)
    detokenizer, matcher = IncrementalDetokenizer(family.decoder), StopStringMatcher(stops)
    sent, matched = "", None
    for delta in [detokenizer.push(chunk) for chunk in chunks] + [detokenizer.finish()]:
        safe, stop = matcher.push(delta)
        sent += safe
        matched = matched or stop
        assert expected_text.startswith(sent)
    sent += matcher.finish()
    assert (sent, matched) == (expected_text, expected_stop)


def test_cost_per_token_does_not_grow_with_the_output(family: Family) -> None:
    ids = family.encode(" ".join(MULTILINGUAL)) * 20
    recorder = RecordingDecoder(family.decoder)
    deltas = _stream(recorder, [[token] for token in ids])
    assert "".join(deltas) == family.decoder.decode(ids)
    # A window holds a few context tokens plus what is pending: at most a character's
    # bytes, or with byte fallback a whole run of byte tokens (held until it ends).
    assert max(recorder.window_sizes) <= 16 + _longest_byte_run(ids, family.decoder.byte_fallback_values)
    assert sum(recorder.window_sizes) <= 12 * len(ids)


def _longest_byte_run(ids: list[int], byte_values: Mapping[int, int]) -> int:
    runs = [
        len(list(run)) for is_byte, run in itertools.groupby(ids, key=byte_values.__contains__) if is_byte
    ]
    return max(runs, default=0)


def test_long_runs_of_byte_tokens_cost_linear_time(family: Family) -> None:
    # 300 emoji with no other token between them: for Mistral one run of 1200 byte
    # tokens, held (it could still turn invalid) and decoded once when it ends.
    ids = family.encode("x" + "😀" * 300 + " end")
    recorder = RecordingDecoder(family.decoder)
    deltas = _stream(recorder, _chunks(ids, 3))
    assert "".join(deltas) == family.decoder.decode(ids)
    assert sum(recorder.window_sizes) <= 12 * len(ids)
