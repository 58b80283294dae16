"""Projections with prepacked oneDNN weights: the same products as ``F.linear``, applied to
every float32 projection of a model loaded on the CPU, and switched off by its variable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.engine.models import load_model
from services.engine.models.cpu_gemm import PackedLinear, packing_applies
from services.engine.models.layers import Linear
from services.optimizer.recipes import get_recipe
from services.optimizer.writer import quantize_checkpoint, write_variant
from tests.checkpoints import make_tiny_checkpoint

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not packing_applies(CPU, torch.float32), reason="this PyTorch build has no oneDNN (or packing is off)"
)


@pytest.mark.parametrize("rows", [0, 1, 5, 17, 300])
def test_packed_product_equals_linear(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(rows, 40, generator=generator)
    packed = PackedLinear.pack(weight, bias)
    torch.testing.assert_close(packed(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_packed_product_keeps_leading_dims_and_half_precision_inputs() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 16, generator=generator)
    x = torch.randn(3, 7, 16, generator=generator)
    packed = PackedLinear.pack(weight, None)
    torch.testing.assert_close(packed(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    half = x.bfloat16()
    out = packed(half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(half.float(), weight).bfloat16())


def test_a_loaded_model_packs_every_projection_and_the_tied_head(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint("qwen2", tmp_path)  # tied embeddings
    model, spec = load_model(checkpoint, CPU, torch.float32)
    assert spec.tie_word_embeddings
    assert not any(isinstance(module, Linear) for module in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    # Packed weights are buffers, so a count of what the model holds (the optimizer bench's) sees them.
    held = {id(tensor) for tensor in model.buffers()}
    packed = [m.packed_weight for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(id(weight) in held for weight in packed)
    rows = torch.randn(4, spec.hidden_size)
    embedding = model.embed_tokens.get_parameter("weight")
    torch.testing.assert_close(model.compute_logits(rows), F.linear(rows, embedding), rtol=1e-5, atol=1e-5)


def test_a_quantized_variant_keeps_one_tied_table(tmp_path: Path) -> None:
    """A variant is made to be small: its tied head reads the embedding table, no packed copy."""
    source = make_tiny_checkpoint("qwen2", tmp_path / "source")
    recipe, variant = get_recipe("int8"), tmp_path / "int8"
    variant.mkdir()
    write_variant(source, quantize_checkpoint(source, recipe), recipe, variant)
    model, spec = load_model(variant, CPU, torch.float32)
    assert spec.tie_word_embeddings and model.lm_head is None
    rows = torch.randn(2, spec.hidden_size)
    logits = model.compute_logits(rows)
    torch.testing.assert_close(logits, F.linear(rows, model.embed_tokens.get_parameter("weight")))


def test_the_variable_keeps_weights_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENLINE_NO_PACKED_GEMM", "1")
    model, _ = load_model(make_tiny_checkpoint("llama", tmp_path), CPU, torch.float32)
    assert not any(isinstance(module, PackedLinear) for module in model.modules())
    assert any(isinstance(module, Linear) for module in model.modules())
