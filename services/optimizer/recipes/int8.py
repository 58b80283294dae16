"""int8 weight-only: symmetric, one scale per output channel; activations stay float."""

from __future__ import annotations

from functools import partial

from services.engine.models.compressed import PACKED_FORMAT, QuantScheme, WeightScheme
from services.optimizer.recipes.base import IGNORED_MODULES, Recipe, symmetric_quantize

SCHEME = QuantScheme(PACKED_FORMAT, WeightScheme(num_bits=8, group_size=None), False, IGNORED_MODULES)

RECIPE = Recipe(
    name="int8",
    description="int8 weights per output channel (W8A16)",
    scheme=SCHEME,
    quantize=partial(symmetric_quantize, scheme=SCHEME.weights),
)
