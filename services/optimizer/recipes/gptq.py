"""The GPTQ recipes: the checkpoint formats of ``int8`` and ``int4``, codes chosen by GPTQ.

Same scheme, same files, same kernels as their round-to-nearest siblings: only which code
each weight gets differs (``services/optimizer/gptq.py``), from the inputs each linear saw
on calibration text (``services/optimizer/calibration.py``). Columns go in descending
order of their inputs' energy ("act-order"), with scales from the weights as given: on
SmolLM2-135M (2026-12-01, 6,197 calibration tokens, the gate's held-out text) that took
int8's top-1 agreement from 0.960 to 0.966 and int4's from 0.636 to 0.707 over GPTQ in
column order (round-to-nearest: 0.956 and 0.593).
"""

from __future__ import annotations

from functools import partial

from services.optimizer.gptq import gptq_quantize
from services.optimizer.recipes import int4, int8
from services.optimizer.recipes.base import Recipe

INT8 = Recipe(
    name="int8-gptq",
    description="int8 weights per output channel (W8A16), GPTQ on the model's own text",
    scheme=int8.SCHEME,
    quantize=int8.RECIPE.quantize,
    quantize_calibrated=partial(gptq_quantize, scheme=int8.SCHEME.weights, act_order=True),
)

INT4 = Recipe(
    name="int4-gptq",
    description=f"int4 weights, groups of {int4.GROUP_SIZE}, GPTQ on the model's own text (W4A16)",
    scheme=int4.SCHEME,
    quantize=int4.RECIPE.quantize,
    quantize_calibrated=partial(gptq_quantize, scheme=int4.SCHEME.weights, act_order=True),
)
