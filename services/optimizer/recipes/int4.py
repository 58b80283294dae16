"""int4 weight-only, group-wise (32 input columns per scale), symmetric round-to-nearest (W4A16).

Group 32 divides the hidden sizes of the demo model (128) and of SmolLM2-135M
(576, 1536); 128 would not divide 576.
"""

from __future__ import annotations

from functools import partial

from services.engine.models.compressed import PACKED_FORMAT, QuantScheme, WeightScheme
from services.optimizer.recipes.base import IGNORED_MODULES, Recipe, symmetric_quantize

GROUP_SIZE = 32
SCHEME = QuantScheme(PACKED_FORMAT, WeightScheme(num_bits=4, group_size=GROUP_SIZE), False, IGNORED_MODULES)

RECIPE = Recipe(
    name="int4",
    description=f"int4 weights, groups of {GROUP_SIZE}, round-to-nearest (W4A16)",
    scheme=SCHEME,
    quantize=partial(symmetric_quantize, scheme=SCHEME.weights),
)
