# ruff: noqa: RUF001  (the corpus mixes look-alike scripts on purpose)
"""A real byte-level BPE tokenizer, trained here, in a Hugging Face checkpoint layout.

Trained with ``tokenizers`` on a small multilingual corpus (Chinese, Japanese,
emoji with ZWJ sequences and flags, accented Latin, Cyrillic, Arabic, Hindi)
so that merges cross character boundaries the way they do in real vocabularies:
many characters end up split over several tokens. The directory holds what
``PromptTokenizer`` reads: tokenizer files, config.json and
generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<s>"
EOS = "</s>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, END_OF_TURN, "<pad>")
VOCAB_SIZE = 700

# Every turn is "<s>role\ncontent<|end|>\n"; a conversation may not open with the assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] == 'assistant' %}"
    "{{ raise_exception('a conversation cannot start with the assistant') }}"
    "{% endif %}"
    "{{ bos_token + message['role'] + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)

CORPUS_LINES = (
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text must never break a character in half.",
    "今天天气很好，我们去公园散步吧。",
    "中文分词和字节级编码是两回事。",
    "日本語のテキストも少し混ぜておきます。",
    "Café, naïve, façade, señor, Zürich, crème brûlée, Ångström.",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Emoji: 😀😃😄 👍🏽 🎉 ❤️ 🔥 🚀",
    "Family 👨\u200d👩\u200d👧\u200d👦 and couple 👩\u200d❤\u200d👨 and technologist 🧑\u200d💻",
    "Flags 🇯🇵 🇫🇷 🇧🇷 🇺🇸 🏳️\u200d🌈",
    "Mixed: hello世界 café😀 Ωmega 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301 a\u0308",
    "Numbers 12345 67890 3.14159 and symbols €£¥ → ∑ ∞",
)


def train_byte_level_bpe(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_LINES * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def write_bpe_checkpoint(
    directory: Path, *, max_position_embeddings: int = 512, chat_template: str | None = CHAT_TEMPLATE
) -> Path:
    """Train the tokenizer and save it with a model config; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    backend = train_byte_level_bpe()
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers leaves it untyped
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token="<pad>"
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(directory))
    eos_id = backend.token_to_id(EOS)
    end_of_turn_id = backend.token_to_id(END_OF_TURN)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": backend.get_vocab_size(),
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": backend.token_to_id(BOS),
        "eos_token_id": eos_id,
    }
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    generation_config = {"eos_token_id": [eos_id, end_of_turn_id]}
    (directory / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    return directory


def byte_token_id(tokenizer: Tokenizer, byte: int) -> int:
    """Id of the vocabulary entry holding exactly one raw byte (every byte has one)."""
    token_id = tokenizer.token_to_id(_byte_level_char(byte))
    if token_id is None:
        raise LookupError(f"byte {byte:#x} has no token")
    return int(token_id)


def _byte_level_char(byte: int) -> str:
    """The printable stand-in the byte-level pre-tokenizer uses for ``byte`` (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the rest map to U+0100 onward in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if byte in printable:
        return chr(byte)
    return chr(256 + sum(1 for other in range(byte) if other not in printable))
