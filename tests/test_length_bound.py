"""The token-count lower bound that lets the tokenizer refuse a huge prompt without
tokenizing it (services/tokenizer/length_bound.py)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from services.errors import InvalidParameterError
from services.tokenizer.length_bound import max_chars_per_token
from services.tokenizer.tokenizer import PromptTokenizer
from tests.bpe_tokenizer import train_byte_level_bpe, write_bpe_checkpoint


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    return train_byte_level_bpe()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    return PromptTokenizer(write_bpe_checkpoint(tmp_path_factory.mktemp("bpe")))


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=400))
def test_the_bound_never_exceeds_the_real_token_count(backend: Tokenizer, text: str) -> None:
    longest = max_chars_per_token(backend)
    assert longest is not None, "a byte-level BPE keeps every character"
    assert len(backend.encode(text, add_special_tokens=False).ids) >= -(-len(text) // longest)


def test_added_tokens_count_as_long_tokens(backend: Tokenizer) -> None:
    """An added token matches its whole literal content in any text: the bound must allow
    for one token covering all of it."""
    longest = max_chars_per_token(backend)
    assert longest is not None
    extended = Tokenizer.from_str(backend.to_str())
    extended.add_tokens(["x" * (longest + 50)])
    assert max_chars_per_token(extended) == longest + 50
    assert len(extended.encode("x" * (longest + 50), add_special_tokens=False).ids) == 1


@pytest.mark.parametrize(
    ("normalizer", "pre_tokenizer"),
    [
        (normalizers.StripAccents(), None),  # drops combining marks
        (normalizers.Replace("a", ""), None),  # deletes characters
        (normalizers.Replace("ab", "c"), None),  # two characters become one
        (None, pre_tokenizers.Whitespace()),  # drops whitespace
        (None, pre_tokenizers.Split(" ", behavior="removed")),
    ],
)
def test_pipelines_that_may_drop_characters_get_no_bound(
    normalizer: normalizers.Normalizer | None, pre_tokenizer: pre_tokenizers.PreTokenizer | None
) -> None:
    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, " ": 2}, merges=[]))
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    assert max_chars_per_token(tokenizer) is None


def test_a_huge_prompt_is_refused_without_tokenizing_it(tokenizer: PromptTokenizer) -> None:
    text = "The quick brown fox. " * 200_000  # 4 MB: seconds of tokenizing
    started = time.perf_counter()
    with pytest.raises(InvalidParameterError) as caught:
        tokenizer.encode_text(text)
    assert time.perf_counter() - started < 0.5
    assert caught.value.field == "prompt"
    assert caught.value.value == len(text)  # a length, never the text
    assert "fox" not in str(caught.value)


def test_a_prompt_under_the_bound_is_still_tokenized_and_checked(tokenizer: PromptTokenizer) -> None:
    """Below the bound the real count decides, as before."""
    with pytest.raises(InvalidParameterError) as caught:
        tokenizer.encode_text("7 " * tokenizer.max_context_length)
    assert caught.value.field == "prompt"
    assert "tokens leave no room" in caught.value.reason
