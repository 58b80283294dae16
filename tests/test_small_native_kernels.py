"""The small native kernels against the PyTorch code they replace: RMS normalisation
(services/engine/rms_norm.c) and the rotary embedding (services/engine/rotary.c)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine import native
from services.engine.models.layers import RMSNorm
from services.engine.models.rope import RopeSpec, RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(
    native.rms_norm_kernel() is None or native.rotary_kernel() is None,
    reason="the native kernels could not be built (no C compiler?)",
)


def _norm(width: int, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(width, eps)
    norm.weight = torch.nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(3)), False)
    return norm


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 37), (2, 5, 64), (0, 576)])
def test_matches_pytorch_on_float32_rows(shape: tuple[int, ...]) -> None:
    norm = _norm(shape[-1])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 7
    with torch.inference_mode():
        actual = norm(x)
        expected = F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    assert actual.shape == x.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_a_zero_row_stays_zero_and_a_non_finite_row_stays_non_finite() -> None:
    norm = _norm(40)
    x = torch.randn(3, 40)
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    with torch.inference_mode():
        y = norm(x)
    assert torch.equal(y[0], torch.zeros(40))
    assert not torch.isfinite(y[1]).all() and not torch.isfinite(y[2]).all()


def test_inputs_the_kernel_does_not_take_use_pytorch() -> None:
    """bfloat16 rows and a strided view go through F.rms_norm and still normalise."""
    norm = _norm(64)
    wide = torch.randn(4, 128)
    view = wide[:, :64]  # not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(norm(view), F.rms_norm(view, (64,), norm.weight, norm.eps))
        half = norm.to(torch.bfloat16)(view.to(torch.bfloat16).contiguous())
    assert half.dtype == torch.bfloat16


def _rotated_by_pytorch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


@pytest.mark.parametrize(
    ("tokens", "heads", "kv_heads", "head_dim"), [(1, 9, 3, 64), (37, 4, 2, 128), (5, 2, 1, 6)]
)
def test_rotary_matches_pytorch_on_the_fused_projection_slice(
    tokens: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=torch.Generator().manual_seed(9))
    rotary = RotaryEmbedding(RopeSpec(), head_dim, torch.device("cpu"))
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(10))
    cos, sin = rotary(positions, torch.float32)
    qk = qkv[:, : heads + kv_heads]  # strided: the v heads sit between tokens
    with torch.inference_mode():
        actual = apply_rotary(qk, cos, sin)
    assert actual.is_contiguous() and actual.shape == qk.shape
    torch.testing.assert_close(actual, _rotated_by_pytorch(qk, cos, sin), rtol=1e-5, atol=1e-5)


def test_rotary_inputs_the_kernel_does_not_take_use_pytorch() -> None:
    x = torch.randn(3, 4, 16).to(torch.bfloat16)
    cos, sin = torch.rand(3, 1, 8).to(torch.bfloat16), torch.rand(3, 1, 8).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(apply_rotary(x, cos, sin), _rotated_by_pytorch(x, cos, sin))
