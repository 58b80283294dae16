"""Next-token logits of whole sequences through the engine's own model code.

The gate scores the variant with the same modules (and kernels) that serve it:
each sequence runs as one prefill over a private paged KV cache, and the logits
of every position come back in float32.
"""

from __future__ import annotations

import torch

from services.engine.attention_batch import AttentionBatch, PrefillSpan
from services.engine.models import LlamaFamilyModel

_BLOCK_SIZE = 16


@torch.inference_mode()
def sequence_logits(model: LlamaFamilyModel, token_ids: list[int]) -> torch.Tensor:
    """float32 logits ``[len(token_ids), vocab]``: row ``i`` predicts token ``i + 1``."""
    spec = model.spec
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // _BLOCK_SIZE)
    dtype = model.norm.weight.dtype  # the engine's dtype (an int8 embedding table has no float weight)
    shape = (spec.num_kv_heads, num_blocks, _BLOCK_SIZE, spec.head_dim)
    caches = [
        (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(spec.num_layers)
    ]
    batch = AttentionBatch(
        slot_mapping=torch.arange(num_tokens, dtype=torch.long),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros((0, 0), dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        max_decode_context_len=0,
        prefills=(PrefillSpan(0, num_tokens, num_tokens, torch.arange(num_blocks, dtype=torch.long)),),
    )
    ids = torch.tensor(token_ids, dtype=torch.long)
    hidden = model(ids, torch.arange(num_tokens, dtype=torch.long), batch, caches)
    return model.compute_logits(hidden)
