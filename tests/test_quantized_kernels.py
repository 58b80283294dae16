"""Numerics of the quantized linears: each native kernel against a float matmul over the same
dequantized weight, fused rows against separate ones, and the int4 packing round trip."""

from __future__ import annotations

import pytest
import torch

from services.engine.models.compressed import (
    QuantizedWeight,
    pack_codes,
    quantization_config,
    scheme_from_config,
    unpack_codes,
)
from services.engine.models.quantized import (
    Int4Linear,
    Int8WeightOnlyLinear,
    W8A8Linear,
    quantize_per_token,
)
from services.engine.models.quantized_vocab import Int8Embedding
from services.errors import InvalidParameterError
from services.optimizer.recipes import RECIPES, get_recipe


def _weight(recipe: str, out_features: int = 96, in_features: int = 128, seed: int = 0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    return RECIPES[recipe].quantize(torch.randn(out_features, in_features, generator=generator))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


@pytest.mark.parametrize(("recipe", "module"), [("int8", Int8WeightOnlyLinear), ("int4", Int4Linear)])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_weight_only_kernels_match_a_float_matmul_on_the_dequantized_weight(
    recipe: str, module: type, rows: int
) -> None:
    weight = _weight(recipe)
    bias = torch.randn(weight.shape[0])
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(1))
    expected = x @ weight.dequantize().T + bias
    actual = module(weight, bias, torch.float32)(x)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    # The kernels run on bfloat16 activations (see quantized.py): ~3 significant digits.
    assert _relative_error(actual, expected) < 1e-2


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("use_int_mm", [True, False])
def test_w8a8_kernels_match_integer_arithmetic_with_per_token_scales(rows: int, use_int_mm: bool) -> None:
    weight = _weight("w8a8")
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(2))
    x_codes, x_scale = quantize_per_token(x)
    exact = (x_codes.double() @ weight.codes.double().T) * x_scale.double() * weight.scale.double().T
    actual = W8A8Linear(weight, None, torch.float32, use_int_mm=use_int_mm)(x)
    if use_int_mm:  # int32 accumulation: exact up to float32 rounding of the scales
        assert torch.allclose(actual.double(), exact, rtol=1e-5, atol=1e-5)
    else:  # same products, output rounded to bfloat16 (and the channel scale stored in it)
        assert _relative_error(actual, exact.float()) < 1e-2
    # ...and int8 activations stay close to the float product.
    assert _relative_error(actual, x @ weight.dequantize().T) < 2e-2


def test_per_token_quantization_uses_the_full_int8_range_per_row() -> None:
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]])
    codes, scale = quantize_per_token(x)
    assert codes[0].tolist() == [32, -127, 64]
    assert codes[1].tolist() == [0, 0, 0]
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize(
    ("recipe", "module"), [("int8", Int8WeightOnlyLinear), ("w8a8", W8A8Linear), ("int4", Int4Linear)]
)
def test_fused_rows_give_the_outputs_of_the_separate_linears(recipe: str, module: type) -> None:
    parts = [_weight(recipe, out_features=rows, seed=seed) for seed, rows in enumerate((64, 32, 32))]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    fused = module(QuantizedWeight.concat(parts), None, torch.float32)(x)
    separate = torch.cat([module(part, None, torch.float32)(x) for part in parts], dim=-1)
    assert torch.equal(fused, separate)


def test_bfloat16_engines_get_bfloat16_outputs() -> None:
    weight = _weight("int8")
    x = torch.randn(2, weight.shape[1]).bfloat16()
    assert Int8WeightOnlyLinear(weight, None, torch.bfloat16)(x).dtype == torch.bfloat16


@pytest.mark.parametrize("num_bits", [4, 8])
def test_packing_round_trips_every_code_and_matches_the_compressed_tensors_package(num_bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    low, high = -(1 << (num_bits - 1)), 1 << (num_bits - 1)
    codes = torch.arange(low, high, dtype=torch.int8).repeat(3, 512 // (high - low))  # [3, 512]
    packed = pack_codes(codes, num_bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 512 * num_bits // 32)
    assert torch.equal(unpack_codes(packed, num_bits, 512), codes)
    assert torch.equal(packed, pack_to_int32(codes, num_bits))


def test_recipes_quantize_symmetric_round_to_nearest() -> None:
    weight = torch.tensor([[1.0, -0.6, 0.3, 0.0] * 8])
    int8 = RECIPES["int8"].quantize(weight)
    assert int8.codes[0, :4].tolist() == [127, -76, 38, 0]  # -76.2 and 38.1 rounded
    int4 = RECIPES["int4"].quantize(weight)
    assert int4.codes[0, :4].tolist() == [7, -4, 2, 0]  # -4.2 and 2.1 rounded
    assert int4.scale.shape == (1, 1)  # one group of 32


def test_fp8_is_written_but_refused_as_not_exercised() -> None:
    with pytest.raises(InvalidParameterError, match="not exercised"):
        get_recipe("fp8")
    with pytest.raises(InvalidParameterError, match="known recipes"):
        get_recipe("int3")


def test_unsupported_quantization_configs_are_refused_with_the_field_named() -> None:
    with pytest.raises(InvalidParameterError, match="quant_method"):
        scheme_from_config({"quantization_config": {"quant_method": "gptq"}})
    asymmetric = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {
            "g": {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 8, "symmetric": False}}
        },
    }
    with pytest.raises(InvalidParameterError, match="symmetric"):
        scheme_from_config({"quantization_config": asymmetric})
    assert scheme_from_config({}) is None


def _table(vocab: int, hidden: int = 64, seed: int = 4) -> QuantizedWeight:
    """An int8-all embedding table with rows of very different magnitudes (as real tables have)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(vocab, hidden, generator=generator) * torch.rand(vocab, 1, generator=generator) * 3
    return RECIPES["int8-all"].quantize(rows)


def test_int8_all_quantizes_the_table_with_one_scale_per_vocab_row() -> None:
    table = _table(300)
    assert table.codes.dtype == torch.int8 and table.scale.shape == (300, 1)
    # Each row's largest magnitude maps to the largest code, whatever the row's scale.
    assert (table.codes.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_embedding_returns_the_dequantized_rows_of_the_tokens(dtype: torch.dtype) -> None:
    table = _table(300)
    ids = torch.tensor([[0, 299, 5, 5], [17, 1, 2, 3]])  # repeats and both ends of the vocabulary
    rows = Int8Embedding(table, dtype)(ids)
    assert rows.dtype == dtype and rows.shape == (2, 4, 64)
    # code * scale in float32, as the dense table holds it: exact, then rounded to the engine dtype.
    assert torch.equal(rows, torch.nn.functional.embedding(ids, table.dequantize()).to(dtype))


@pytest.mark.parametrize("vocab", [300, 1014, 49152])  # tiny test models, the demo model, SmolLM2
def test_int8_lm_head_logits_match_a_float_matmul_on_the_dequantized_table(vocab: int) -> None:
    table = _table(vocab)
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    logits = Int8WeightOnlyLinear(table, None, torch.float32)(hidden)
    expected = hidden @ table.dequantize().T
    assert logits.shape == (5, vocab)
    assert _relative_error(logits, expected) < 1e-2  # bfloat16 activations inside the kernel
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("recipe", ["int8", "int8-all", "w8a8", "int4"])
def test_every_recipe_scheme_survives_its_config_json_entry(recipe: str) -> None:
    scheme = RECIPES[recipe].scheme
    assert scheme_from_config({"quantization_config": quantization_config(scheme)}) == scheme


def test_an_embedding_target_is_refused_unless_weight_only_int8_per_channel() -> None:
    config = quantization_config(RECIPES["int8-all"].scheme)
    config["config_groups"]["group_0"]["weights"] = {
        **config["config_groups"]["group_0"]["weights"],
        "num_bits": 4,
        "strategy": "group",
        "group_size": 32,
    }
    with pytest.raises(InvalidParameterError, match=r"quantization_config\.targets"):
        scheme_from_config({"quantization_config": config})
