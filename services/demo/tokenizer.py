"""The demo model's tokenizer: byte-level BPE trained with ``tokenizers``.

Byte-level, so every UTF-8 string encodes (no unknown token) and multi-byte
characters may span several tokens, as in production vocabularies. Digits are
always single tokens: arithmetic over digit tokens is learnable by a small model,
arithmetic over arbitrary digit chunks is not.

Written as ``tokenizer.json`` + ``tokenizer_config.json`` so that
``transformers.AutoTokenizer.from_pretrained`` loads it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.errors import InvalidParameterError

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)  # ids 0..5 in this order
MODEL_MAX_LENGTH = 2048

# A turn is "<|role|>\ncontent" followed by EOS for the assistant (so generation
# stops by itself) or a newline otherwise.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the vocabulary may end below ``vocab_size``
    when the texts run out of pairs worth merging."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= minimum:
        raise InvalidParameterError("vocab_size", vocab_size, f"must exceed {minimum} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, _token_id(tokenizer, BOS_TOKEN))],
    )
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    """The ``tokenizer_config.json`` that pairs with a tokenizer from ``train_bpe_tokenizer``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS),
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False, sort_keys=True)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


def load_tokenizer(checkpoint_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as users get it: ``AutoTokenizer`` over the written files."""
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    if tokenizer is None:
        raise InvalidParameterError("path", str(checkpoint_dir), "holds no loadable tokenizer")
    return tokenizer


@dataclass(frozen=True)
class SpecialTokenIds:
    pad: int
    bos: int
    eos: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SpecialTokenIds:
        return cls(
            pad=_token_id(tokenizer, PAD_TOKEN),
            bos=_token_id(tokenizer, BOS_TOKEN),
            eos=_token_id(tokenizer, EOS_TOKEN),
        )


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise InvalidParameterError("tokenizer.special_tokens", token, "missing from the vocabulary")
    return int(token_id)
