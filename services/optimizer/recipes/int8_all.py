"""int8 weight-only everywhere a matrix is: the layers' linears per output channel, and the
embedding table and ``lm_head`` per vocabulary row (symmetric, one scale per row).

The embedding table of a small model is a large share of its bytes (SmolLM2-135M: 28 M of
135 M parameters), and with tied embeddings it is also the ``lm_head``, whose matmul is about
a fifth of the model's decode FLOPs: quantized, both the lookup and the logits read int8.
Stored ``int-quantized`` (see ``services.engine.models.compressed``).
"""

from __future__ import annotations

from functools import partial

from services.engine.models.compressed import INT_FORMAT, VOCAB_TARGETS, QuantScheme, WeightScheme
from services.optimizer.recipes.base import Recipe, symmetric_quantize

SCHEME = QuantScheme(
    INT_FORMAT, WeightScheme(num_bits=8, group_size=None), False, ignore=(), targets=VOCAB_TARGETS
)

RECIPE = Recipe(
    name="int8-all",
    description="int8 weights per output channel, embedding table and lm_head per vocab row (W8A16)",
    scheme=SCHEME,
    quantize=partial(symmetric_quantize, scheme=SCHEME.weights),
)
