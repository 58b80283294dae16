"""PromptTokenizer on a real byte-level BPE checkpoint trained in the fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from services.errors import InvalidParameterError
from services.tokenizer import (
    ChatMessage,
    ChatPrompt,
    Prompt,
    TextPrompt,
    TokenIdsPrompt,
)
from services.tokenizer.tokenizer import PromptTokenizer
from tests.bpe_tokenizer import BOS, END_OF_TURN, EOS, VOCAB_SIZE, write_bpe_checkpoint

CONTEXT = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bpe_checkpoint(tmp_path_factory.mktemp("bpe"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> PromptTokenizer:
    return PromptTokenizer(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Tokenizer:
    """The same tokenizer.json read by the tokenizers library alone, to compare against."""
    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: Path) -> Any:
    """The checkpoint as transformers loads it: the behaviour PromptTokenizer must match."""
    return AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)


def _field_of(error: pytest.ExceptionInfo[InvalidParameterError]) -> str:
    return error.value.field


def test_reports_vocabulary_context_and_every_declared_eos(
    tokenizer: PromptTokenizer, reference: Tokenizer
) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.max_context_length == CONTEXT
    # EOS from config.json plus the end-of-turn id only generation_config.json declares.
    eos, end_of_turn = reference.token_to_id(EOS), reference.token_to_id(END_OF_TURN)
    assert tokenizer.eos_token_ids == (eos, end_of_turn)


# At most 4 byte-level tokens per character plus BOS must fit the test model's context.
@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=(CONTEXT - 2) // 4))
def test_encode_text_matches_transformers_and_round_trips(
    tokenizer: PromptTokenizer, hf_tokenizer: Any, text: str
) -> None:
    ids = tokenizer.encode_text(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_are_added_only_when_asked(tokenizer: PromptTokenizer, reference: Tokenizer) -> None:
    with_bos = tokenizer.encode_text("hello 世界")
    without = tokenizer.encode_text("hello 世界", add_special_tokens=False)
    assert with_bos == [reference.token_to_id(BOS), *without]


def test_empty_text_is_rejected_naming_the_prompt(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.encode_text("")
    assert _field_of(error) == "prompt"


def test_lone_surrogate_is_rejected_naming_the_text(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.encode_text("abc\ud800def")
    assert _field_of(error) == "prompt.text"
    assert error.value.value == "\ud800"


def test_prompt_must_leave_room_for_one_output_token(tokenizer: PromptTokenizer) -> None:
    assert len(tokenizer.validate_token_ids([5] * (CONTEXT - 1))) == CONTEXT - 1
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.validate_token_ids([5] * CONTEXT)
    assert _field_of(error) == "prompt"
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.encode_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert _field_of(error) == "prompt"


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE, 2**32])
def test_token_ids_outside_the_vocabulary_are_rejected(tokenizer: PromptTokenizer, bad_id: int) -> None:
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.validate_token_ids([3, 4, bad_id, 5])
    assert _field_of(error) == "prompt.token_ids"
    assert error.value.value == bad_id
    assert "position 2" in error.value.reason


def test_boundary_token_ids_are_accepted(tokenizer: PromptTokenizer) -> None:
    assert tokenizer.validate_token_ids([0, VOCAB_SIZE - 1]) == [0, VOCAB_SIZE - 1]


def test_empty_token_ids_are_rejected_naming_the_prompt(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.validate_token_ids([])
    assert _field_of(error) == "prompt"


def test_chat_uses_the_template_with_the_generation_prompt(
    tokenizer: PromptTokenizer, hf_tokenizer: Any
) -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "你好 👋")]
    expected_text = f"{BOS}system\nBe brief.{END_OF_TURN}\n{BOS}user\n你好 👋{END_OF_TURN}\n{BOS}assistant\n"
    expected = hf_tokenizer.encode(expected_text, add_special_tokens=False)
    assert tokenizer.encode_chat(messages) == expected


@pytest.mark.parametrize(
    ("messages", "reason_part"),
    [
        ([], "no messages"),
        ([ChatMessage("user", "hi"), ChatMessage("wizard", "hi")], "message 1 has an unknown role"),
        ([ChatMessage("assistant", "I start")], "cannot start with the assistant"),
    ],
)
def test_bad_chats_are_rejected_naming_the_chat(
    tokenizer: PromptTokenizer, messages: list[ChatMessage], reason_part: str
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.encode_chat(messages)
    assert _field_of(error) == "prompt.chat"
    assert reason_part in error.value.reason


def test_chat_without_a_template_is_rejected(tmp_path: Path) -> None:
    tokenizer = PromptTokenizer(write_bpe_checkpoint(tmp_path, chat_template=None))
    assert not tokenizer.has_chat_template
    with pytest.raises(InvalidParameterError) as error:
        tokenizer.encode_chat([ChatMessage("user", "hi")])
    assert _field_of(error) == "prompt.chat"
    assert "no chat template" in error.value.reason


def test_batch_keeps_order_and_isolates_bad_prompts(tokenizer: PromptTokenizer) -> None:
    chat = ChatPrompt([ChatMessage("user", "Café?")])
    prompts: list[Prompt] = [
        TextPrompt("今天天气很好"),
        TokenIdsPrompt([VOCAB_SIZE]),
        chat,
        TextPrompt("no bos", add_special_tokens=False),
        TextPrompt(""),
        TokenIdsPrompt([7, 8]),
    ]
    results = tokenizer.encode_batch(prompts)
    assert results[0] == tokenizer.encode_text("今天天气很好")
    assert isinstance(results[1], InvalidParameterError) and results[1].field == "prompt.token_ids"
    assert results[2] == tokenizer.encode_chat(chat.messages)
    assert results[3] == tokenizer.encode_text("no bos", add_special_tokens=False)
    assert isinstance(results[4], InvalidParameterError) and results[4].field == "prompt"
    assert results[5] == [7, 8]
    assert [tokenizer.encode(prompt) for prompt in (prompts[0], prompts[2], prompts[5])] == [
        results[0],
        results[2],
        results[5],
    ]


def test_truncation_configured_in_tokenizer_json_is_ignored(checkpoint: Path, tmp_path: Path) -> None:
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    truncating = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    truncating.enable_truncation(max_length=3)
    truncating.save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["truncation"] is not None
    text = "The quick brown fox jumps over the lazy dog."
    assert len(PromptTokenizer(tmp_path).encode_text(text)) > 3


def test_directory_without_config_is_rejected(checkpoint: Path, tmp_path: Path) -> None:
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").unlink()
    with pytest.raises(InvalidParameterError) as error:
        PromptTokenizer(tmp_path)
    assert _field_of(error) == "checkpoint_dir"
