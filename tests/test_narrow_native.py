"""The native matmuls over narrow weights (``services/engine/narrow_*.c``): int8 and
bfloat16 numerics against a float matmul, at shapes that exercise every edge of the blocking
(rows in odd counts, columns not a multiple of the vector width, output rows not a multiple
of the block, rows longer than one integer chunk), with one and two threads; the modules
falling back to PyTorch where the kernel cannot serve a call; and a quantized variant's tied
bfloat16 table kept in bfloat16 on a float32 engine, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from services.engine.models import load_model
from services.engine.models.compressed import QuantizedWeight
from services.engine.models.half_vocab import Bf16TableHead, WideningEmbedding
from services.engine.models.narrow_native import (
    INT8_LEVELS,
    bf16_matmul,
    int4_matmul,
    int8_matmul,
    native_kernels_available,
    pack_int4_codes,
)
from services.engine.models.quantized import Int4Linear, Int8WeightOnlyLinear, W8A8Linear, quantize_per_token
from services.optimizer.recipes import RECIPES, get_recipe
from services.optimizer.writer import quantize_checkpoint, write_variant
from tests.checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    not native_kernels_available(), reason="no C compiler here, so the native int8 kernel is not built"
)


def _weight(out_features: int, in_features: int, seed: int = 0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    return RECIPES["int8"].quantize(torch.randn(out_features, in_features, generator=generator))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"), [(1, 96, 128), (2, 97, 100), (5, 30, 576), (33, 7, 1537)]
)
def test_matches_a_float_matmul_on_the_dequantized_weight(
    rows: int, out_features: int, in_features: int, threads: int
) -> None:
    weight = _weight(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ weight.dequantize().double().T
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = int8_matmul(x, weight.codes.to(torch.int8).contiguous(), weight.scale.reshape(-1).float())
    finally:
        torch.set_num_threads(previous)
    assert actual is not None and actual.dtype == torch.float32 and actual.shape == (rows, out_features)
    # Activations go to int16 per row (a step of max|x| / 32767): four significant digits and
    # more, where the bfloat16 activations of the torch kernel give about three.
    assert _relative_error(actual.double(), expected) < 2e-4


@pytest.mark.parametrize("rows", [1, 2, 17])
def test_w8a8_rows_give_the_exact_integer_products_of_per_token_codes(rows: int) -> None:
    weight = RECIPES["w8a8"].quantize(torch.randn(50, 333, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(rows, 333, generator=torch.Generator().manual_seed(5))
    x_codes, x_scale = quantize_per_token(x)
    exact = (
        (x_codes.double() @ weight.codes.double().T) * x_scale.double() * weight.scale.double().reshape(1, -1)
    )
    codes, scale = weight.codes.to(torch.int8).contiguous(), weight.scale.reshape(-1).float()
    actual = int8_matmul(x, codes, scale, INT8_LEVELS)
    assert actual is not None
    # The kernel's codes are quantize_per_token's; integer sums are exact; only the float32
    # scaling rounds.
    torch.testing.assert_close(actual.double(), exact, rtol=1e-6, atol=1e-6)
    layer = W8A8Linear(weight, None, torch.float32, use_int_mm=False)
    assert layer.native
    torch.testing.assert_close(layer(x).double(), exact, rtol=1e-6, atol=1e-6)


def test_long_rows_at_the_extremes_do_not_overflow() -> None:
    # Every product at its largest (127 x 32767) over 5,000 columns: 2e10, ten times what an
    # int32 holds; the kernel's chunks and lane sums must carry it.
    in_features = 5000
    codes = torch.full((4, in_features), 127, dtype=torch.int8)
    codes[1] = -127
    scale = torch.ones(4)
    x = torch.ones(3, in_features)
    actual = int8_matmul(x, codes, scale)
    assert actual is not None
    expected = torch.tensor([127.0 * in_features, -127.0 * in_features]).expand(3, 2)
    torch.testing.assert_close(actual[:, :2], expected, rtol=1e-6, atol=0.0)


def test_a_row_that_is_not_finite_falls_back_to_the_torch_kernel() -> None:
    weight = _weight(16, 64)
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    codes = weight.codes.to(torch.int8).contiguous()
    assert int8_matmul(x, codes, weight.scale.reshape(-1).float()) is None
    y = Int8WeightOnlyLinear(weight, None, torch.float32)(x)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert not torch.isfinite(y[1]).all()  # as a float matmul would give


def test_the_torch_fallback_gives_the_same_outputs_to_bfloat16_precision() -> None:
    weight = _weight(64, 256)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    module = Int8WeightOnlyLinear(weight, None, torch.float32)
    assert module.native
    by_native = module(x)
    module.native = False
    by_torch = module(x)
    assert _relative_error(by_torch, by_native) < 1e-2


def test_no_rows_give_an_empty_result() -> None:
    weight = _weight(8, 32)
    actual = int8_matmul(
        torch.empty(0, 32), weight.codes.to(torch.int8).contiguous(), weight.scale.reshape(-1).float()
    )
    assert actual is not None and actual.shape == (0, 8)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 96, 128), (3, 97, 100), (17, 6, 577)])
def test_bf16_weights_give_the_float32_product(
    rows: int, out_features: int, in_features: int, threads: int
) -> None:
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = bf16_matmul(x, weight)
    finally:
        torch.set_num_threads(previous)
    assert actual is not None and actual.dtype == torch.float32
    torch.testing.assert_close(actual, x @ weight.float().T, rtol=1e-5, atol=1e-4)


def _bfloat16_checkpoint(out_dir: Path) -> Path:
    source = make_tiny_checkpoint("llama", out_dir, tie_word_embeddings=True)
    weights = source / "model.safetensors"
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in load_file(weights).items()}, weights)
    return source


def test_a_variant_keeps_its_tied_bfloat16_table_and_its_logits(tmp_path: Path) -> None:
    source = _bfloat16_checkpoint(tmp_path / "source")
    recipe, variant = get_recipe("int8"), tmp_path / "int8"
    variant.mkdir()
    write_variant(source, quantize_checkpoint(source, recipe), recipe, variant)
    model, spec = load_model(variant, torch.device("cpu"), torch.float32)
    assert spec.tie_word_embeddings
    assert isinstance(model.embed_tokens, WideningEmbedding) and isinstance(model.lm_head, Bf16TableHead)
    table = model.embed_tokens.weight
    assert table.dtype == torch.bfloat16 and model.lm_head.table is table  # one table, half the bytes
    ids = torch.tensor([0, 5, 7])
    assert torch.equal(model.embed_tokens(ids), table.float()[ids])
    rows = torch.randn(5, spec.hidden_size)
    torch.testing.assert_close(
        model.compute_logits(rows), F.linear(rows, table.float()), rtol=1e-5, atol=1e-5
    )


def _int4_weight(out_features: int, in_features: int, group_size: int) -> QuantizedWeight:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(7))
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    scale = (groups.abs().amax(dim=-1) / 7).clamp(min=1e-8)  # [out, groups]
    codes = torch.round(groups / scale[..., None]).clamp(-8, 7).reshape(out_features, in_features)
    return QuantizedWeight(codes.to(torch.int8), scale, num_bits=4, group_size=group_size)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features", "group_size"),
    [(1, 96, 128, 32), (2, 97, 576, 32), (5, 30, 1536, 64), (33, 7, 256, 128)],
)
def test_int4_matches_a_float_matmul_on_the_dequantized_weight(
    rows: int, out_features: int, in_features: int, group_size: int, threads: int
) -> None:
    weight = _int4_weight(out_features, in_features, group_size)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(8))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = int4_matmul(x, pack_int4_codes(weight.codes), weight.scale.float().contiguous(), group_size)
    finally:
        torch.set_num_threads(previous)
    assert actual is not None and actual.shape == (rows, out_features)
    expected = x.double() @ weight.dequantize().double().T
    assert _relative_error(actual.double(), expected) < 2e-4  # int16 activations, as for int8


def test_int4_layer_unpacks_its_nibbles_to_the_codes_and_falls_back_on_non_finite_rows() -> None:
    weight = _int4_weight(16, 64, 32)
    layer = Int4Linear(weight, None, torch.float32)
    assert layer.native
    assert torch.equal(layer._dequantized(), weight.dequantize())
    x = torch.randn(3, 64)
    x[2, 0] = float("nan")
    y = layer(x)
    assert torch.isfinite(y[:2]).all() and not torch.isfinite(y[2]).all()
    torch.testing.assert_close(y[:2], x[:2] @ weight.dequantize().T, rtol=1e-3, atol=1e-3)
