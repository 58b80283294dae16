"""What every recipe is: a compressed-tensors scheme plus a function that quantizes one weight.

Recipes are plain PyTorch. Quantization is symmetric, with the scale chosen so that the
largest magnitude of a row (or a row's group) maps to the largest code; codes are rounded
to nearest, or chosen by GPTQ from calibration (``*-gptq``, ``services/optimizer/gptq.py``).
Embeddings and ``lm_head`` are left alone unless the recipe's scheme targets ``Embedding``
(``int8-all``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.models.compressed import QuantizedWeight, QuantScheme, WeightScheme

IGNORED_MODULES = ("lm_head",)  # kept in the source dtype, as are the embeddings (not a Linear)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    scheme: QuantScheme
    quantize: Callable[[torch.Tensor], QuantizedWeight]  # round-to-nearest, from the weight alone
    exercised: bool = True  # False: written for hardware this project has not run it on
    # (weight, X^T X of its inputs) -> codes: the decoder linears of a calibrated recipe (GPTQ)
    quantize_calibrated: Callable[[torch.Tensor, torch.Tensor], QuantizedWeight] | None = None

    @property
    def calibrated(self) -> bool:
        return self.quantize_calibrated is not None


def symmetric_quantize(weight: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Round-to-nearest codes and float32 scales, per output channel or per input group."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    group = scheme.group_size or in_features
    if in_features % group:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group}")
    grouped = w.view(out_features, in_features // group, group)
    # A positive floor keeps all-zero rows from dividing by zero.
    scale = (grouped.abs().amax(dim=-1) / scheme.max_code).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(grouped / scale[..., None]).clamp(scheme.min_code, scheme.max_code)
    return QuantizedWeight(
        codes.view(out_features, in_features).to(torch.int8), scale, scheme.num_bits, scheme.group_size
    )
