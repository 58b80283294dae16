"""The native int8-weight matmul (``services/engine/int8_matmul.c``): its numerics against a
float matmul on the dequantized weight, at shapes that exercise every edge of its blocking
(rows in odd counts, columns not a multiple of the vector width, output rows not a multiple
of the block, rows longer than one integer chunk), with one and two threads; and the module
falling back to PyTorch where the kernel cannot serve a call."""

from __future__ import annotations

import pytest
import torch

from services.engine.models.compressed import QuantizedWeight
from services.engine.models.int8_native import int8_matmul, int8_matmul_codes, native_int8_available
from services.engine.models.quantized import Int8WeightOnlyLinear, W8A8Linear, quantize_per_token
from services.optimizer.recipes import RECIPES

pytestmark = pytest.mark.skipif(
    not native_int8_available(), reason="no C compiler here, so the native int8 kernel is not built"
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
def test_quantized_rows_give_the_exact_integer_products_scaled(rows: int) -> None:
    weight = RECIPES["w8a8"].quantize(torch.randn(50, 333, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(rows, 333, generator=torch.Generator().manual_seed(5))
    x_codes, x_scale = quantize_per_token(x)
    exact = (
        (x_codes.double() @ weight.codes.double().T) * x_scale.double() * weight.scale.double().reshape(1, -1)
    )
    codes, scale = weight.codes.to(torch.int8).contiguous(), weight.scale.reshape(-1).float()
    actual = int8_matmul_codes(x_codes, x_scale, codes, scale)
    assert actual is not None
    # Integer sums are exact; only the float32 scaling rounds.
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
