"""fp8 (e4m3) weights per output channel, for GPUs with fp8 matmuls.

NOT EXERCISED: this project runs on CPUs only, the engine has no fp8 kernel and
the optimizer refuses to run a recipe whose ``exercised`` flag is False. The
quantizer below is kept so that the recipe table is complete; it has not been
served or gated anywhere.
"""

from __future__ import annotations

import torch

from services.engine.models.compressed import FLOAT_FORMAT, QuantizedWeight, QuantScheme, WeightScheme
from services.optimizer.recipes.base import IGNORED_MODULES, Recipe

_FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCHEME = QuantScheme(
    FLOAT_FORMAT, WeightScheme(num_bits=8, group_size=None, type="float"), False, IGNORED_MODULES
)


def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (w / scale).to(torch.float8_e4m3fn)
    return QuantizedWeight(codes, scale, 8, None)


RECIPE = Recipe(
    name="fp8",
    description="fp8 e4m3 weights per channel (GPU only; not exercised here)",
    scheme=SCHEME,
    quantize=quantize_fp8,
    exercised=False,
)
