"""Held-out token sequences for the gate's perplexity, KL and top-1 figures.

For the demo model: the held-out addition and counting examples (prompt and
answer), which training never showed. For any other model: a text file the model
cannot have seen in training — by default the project's own design document,
written after SmolLM2 was released — cut into fixed windows of tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

from transformers import AutoTokenizer

from services.demo.corpus import addition_example, addition_pairs, counting_example, counting_pairs
from services.errors import InvalidParameterError

PACKAGED_TEXT = Path(__file__).parent / "data" / "heldout-design.txt"
_DEMO_SEED = "tokenline-gate-heldout-v1"
_DEMO_EXAMPLES_PER_TASK = 64


def demo_sequences(model_dir: Path) -> list[list[int]]:
    """Held-out demo examples, one per sequence as in training (prompt, answer, EOS)."""
    rng = random.Random(_DEMO_SEED)
    additions = rng.sample(addition_pairs(held_out=True), _DEMO_EXAMPLES_PER_TASK)
    countings = rng.sample(counting_pairs(held_out=True), _DEMO_EXAMPLES_PER_TASK)
    examples = [addition_example(*p) for p in additions] + [counting_example(*p) for p in countings]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [list(tokenizer(e.prompt + e.answer).input_ids) + eos for e in examples]


def text_sequences(model_dir: Path, text_file: Path | None, max_tokens: int, window: int) -> list[list[int]]:
    """Up to ``max_tokens`` tokens of the text, in windows of ``window`` tokens (BOS first when the
    tokenizer has one)."""
    path = text_file or PACKAGED_TEXT
    if not path.is_file():
        raise InvalidParameterError("heldout_text", str(path), "no such file")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = list(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)[:max_tokens]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = window - len(bos)
    windows = [bos + ids[i : i + body] for i in range(0, len(ids), body)]
    return [w for w in windows if len(w) > len(bos) + 1]
