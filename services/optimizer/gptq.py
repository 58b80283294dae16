"""GPTQ: quantize a linear's weight column by column, folding each column's rounding error
into the columns not yet quantized, weighted by how the layer's inputs correlate.

Round-to-nearest minimises the error of each weight; what matters is the error of the
layer's output on real inputs, ``||X W^T - X Q^T||``. With ``H = X^T X`` (the inputs'
second moments, from calibration), Frantar et al. (2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") quantize one input column at a time
and move its error onto the remaining columns through the inverse of ``H``, processed in
blocks so that the update of the far columns is one matrix product. Scales are chosen as
round-to-nearest chooses them (largest magnitude of the row or group maps to the largest
code) — from the weights as updated when a group is reached in column order, from the weights
as given with act-order (columns by descending input energy, as the recipes use it) — and
rounded to the dtype the checkpoint stores them in before any code is chosen, so that the
codes fit the stored scale.
"""

from __future__ import annotations

import torch

from services.engine.models.compressed import QuantizedWeight, WeightScheme
from services.errors import InvalidParameterError

DAMPING = 0.01  # times the mean diagonal of H, added to it: keeps H invertible (the paper's value)
BLOCK_COLUMNS = 128  # columns updated together before the rest get the block's error


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype | None = None,
    act_order: bool = False,
) -> QuantizedWeight:
    """Codes and scales for ``weight`` [out, in] given its inputs' ``hessian`` [in, in]
    (``X^T X`` over calibration tokens, any positive multiple). ``scale_dtype``: what the
    scales are stored in (default the weight's own dtype). ``act_order``: quantize the columns
    whose inputs are largest first (scales then come from the weights as given, since a
    group's columns are no longer reached together)."""
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        expected = f"expected ({in_features}, {in_features})"
        raise InvalidParameterError("hessian", tuple(hessian.shape), expected)
    group = scheme.group_size or in_features
    if in_features % group:
        raise InvalidParameterError("group_size", group, f"must divide in_features={in_features}")
    stored = scale_dtype or weight.dtype
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(in_features, dtype=torch.float64)
    order = torch.arange(in_features)
    fixed_scales = None
    if act_order:
        fixed_scales = torch.stack(
            [_scale(w[:, g : g + group], scheme, stored) for g in range(0, in_features, group)], dim=1
        )
        order = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros((out_features, in_features), dtype=torch.int8)
    scales = torch.zeros((out_features, in_features // group), dtype=torch.float64)
    scale = torch.ones(out_features, dtype=torch.float64)
    for start in range(0, in_features, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            if fixed_scales is not None:
                scale = fixed_scales[:, column // group]
            elif column % group == 0:  # a new group: its scale from the weights as they stand now
                upcoming = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group]
                scale = _scale(upcoming, scheme, stored)
                scales[:, column // group] = scale
            q = torch.round(block[:, i] / scale).clamp(scheme.min_code, scheme.max_code)
            codes[:, column] = q.to(torch.int8)
            error = (block[:, i] - q * scale) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    if fixed_scales is not None:
        scales = fixed_scales
    return QuantizedWeight(codes, scales.float(), scheme.num_bits, scheme.group_size)


def _scale(columns: torch.Tensor, scheme: WeightScheme, stored: torch.dtype) -> torch.Tensor:
    """Per row: the largest magnitude over ``columns`` maps to the largest code; rounded to
    ``stored``, with a positive floor so an all-zero row does not divide by zero."""
    tiny = torch.finfo(torch.float32).tiny
    scale = (columns.abs().amax(dim=1) / scheme.max_code).clamp(min=tiny)
    return scale.to(stored).double().clamp(min=tiny)
