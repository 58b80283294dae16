"""Building blocks shared by every Llama-family layer: RMSNorm and the gated MLP.

Parameters are created empty; the loader assigns the checkpoint's tensors. The
model is built under ``torch.device("meta")`` so that construction never
allocates or initialises memory that the checkpoint would overwrite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import native


def empty_parameter(*shape: int) -> nn.Parameter:
    """A placeholder for a checkpoint tensor; inference never needs gradients."""
    return nn.Parameter(torch.empty(shape), requires_grad=False)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, scaled by a learned weight."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_parameter(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        kernel = native.rms_norm_kernel()
        plain = x.dtype == weight.dtype == torch.float32 and x.is_cpu and x.is_contiguous()
        if kernel is not None and plain and not x.requires_grad:
            # One native call instead of PyTorch's six operators (see rms_norm.c).
            y = torch.empty_like(x)
            width = x.shape[-1]
            rows = x.numel() // width if width else 0
            kernel(x.data_ptr(), rows, width, weight.data_ptr(), self.eps, y.data_ptr())
            return y
        # It accumulates in float32 for half-precision inputs.
        return F.rms_norm(x, weight.shape, weight, self.eps)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with checkpoint-assigned parameters (``nn.Linear`` would random-init)."""

    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = empty_parameter(out_features, in_features)
        self.bias = empty_parameter(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        # Weights held in float32 for a half-precision model (see loader.matmul_dtype): exactly a
        # half-precision GEMM with float32 accumulation, its output rounded back to x's dtype.
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``.

    ``gate_proj`` and ``up_proj`` live in one matrix (gate rows first) so that
    a step reads the input once and launches one matmul instead of two.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        out: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return out
