"""GPTQ (services/optimizer/gptq.py): on correlated inputs it leaves a smaller output error than
round-to-nearest with the same scheme; on uncorrelated inputs it is round-to-nearest; its
scales are those the checkpoint stores; bad statistics are refused naming the field."""

from __future__ import annotations

import pytest
import torch

from services.engine.models.compressed import WeightScheme
from services.errors import InvalidParameterError
from services.optimizer.gptq import gptq_quantize
from services.optimizer.recipes.base import symmetric_quantize

SCHEMES = {"int8 per channel": WeightScheme(8, None), "int4 groups of 32": WeightScheme(4, 32)}


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs whose features share a few strong directions (the same ones whatever ``seed``,
    which draws the tokens), as a layer's inputs do."""
    mixing = torch.randn(width // 8, width, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    strong = torch.randn(tokens, width // 8, generator=generator) @ mixing
    return strong + 0.1 * torch.randn(tokens, width, generator=generator)


def _output_error(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    return float((x @ (weight - dequantized).T).norm() / (x @ weight.T).norm())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_gptq_leaves_less_output_error_than_round_to_nearest(scheme: WeightScheme, act_order: bool) -> None:
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    calibration = _correlated_inputs(2048, 256, seed=2)
    held_out = _correlated_inputs(512, 256, seed=3)  # the same kind of inputs, not seen by GPTQ
    gptq = gptq_quantize(weight, calibration.T.double() @ calibration.double(), scheme, act_order=act_order)
    nearest = symmetric_quantize(weight, scheme)
    assert gptq.codes.dtype == torch.int8 and gptq.scale.shape == nearest.scale.shape
    assert int(gptq.codes.min()) >= scheme.min_code and int(gptq.codes.max()) <= scheme.max_code
    ours = _output_error(held_out, weight, gptq.dequantize())
    theirs = _output_error(held_out, weight, nearest.dequantize())
    assert ours < 0.7 * theirs, (ours, theirs)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_uncorrelated_inputs_give_the_round_to_nearest_codes(scheme: WeightScheme, act_order: bool) -> None:
    """With H diagonal no column's error has anywhere to go, whatever the order."""
    weight = torch.randn(40, 128, generator=torch.Generator().manual_seed(4))
    energy = torch.linspace(1.0, 3.0, 128, dtype=torch.float64)  # distinct: act-order reorders
    gptq = gptq_quantize(weight, torch.diag(energy), scheme, act_order=act_order)
    nearest = symmetric_quantize(weight, scheme)
    assert torch.equal(gptq.codes, nearest.codes)
    torch.testing.assert_close(gptq.scale, nearest.scale)


def test_scales_are_rounded_to_the_stored_dtype_before_codes_are_chosen() -> None:
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x = _correlated_inputs(256, 64, seed=6)
    for act_order in (False, True):
        result = gptq_quantize(weight, x.T.double() @ x.double(), WeightScheme(8, None), act_order=act_order)
        assert torch.equal(result.scale, result.scale.to(torch.bfloat16).float())


def test_an_input_that_never_fires_does_not_break_the_factorisation() -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    x = _correlated_inputs(256, 64, seed=8)
    x[:, 5] = 0.0
    result = gptq_quantize(weight, x.T.double() @ x.double(), WeightScheme(4, 32), act_order=True)
    assert torch.isfinite(result.scale).all() and int(result.codes[:, 5].abs().max()) == 0


def test_statistics_of_the_wrong_shape_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidParameterError, match="hessian"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32, dtype=torch.float64), WeightScheme(8, None))
