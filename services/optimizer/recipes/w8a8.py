"""int8 weights per output channel + int8 activations quantized per token at run time (W8A8).

Only the weights are quantized offline; the activation scheme (dynamic, symmetric,
one scale per token) goes into the checkpoint's config for the engine to apply.
"""

from __future__ import annotations

from functools import partial

from services.engine.models.compressed import INT_FORMAT, QuantScheme, WeightScheme
from services.optimizer.recipes.base import IGNORED_MODULES, Recipe, symmetric_quantize

SCHEME = QuantScheme(INT_FORMAT, WeightScheme(num_bits=8, group_size=None), True, IGNORED_MODULES)

RECIPE = Recipe(
    name="w8a8",
    description="int8 weights per channel, int8 dynamic per-token activations",
    scheme=SCHEME,
    quantize=partial(symmetric_quantize, scheme=SCHEME.weights),
)
