"""A quantized variant's tied bfloat16 vocabulary table, kept in bfloat16 on a float32 engine.

The recipes that leave the vocabulary alone (``int8``, ``w8a8``, ``int4``) write the embedding
table in the source's dtype, bfloat16 for SmolLM2. A float32 engine would widen it to float32
at load: twice the bytes held (113 MB instead of 57 for SmolLM2) and twice the bytes the tied
output projection streams each decode step, the largest single read of a quantized variant.

Here the table stays bfloat16: :class:`WideningEmbedding` gathers the step's rows and widens
only those (exact: bfloat16 is a truncated float32), and :class:`Bf16TableHead` computes the
logits in float32 from the same tensor with the native kernel of ``narrow_native``. Both hold
the one table as a buffer; counting a model's buffers sees it once.

Applied only where nothing changes but speed and bytes: a tied table of a quantized variant
on a float32 CPU engine, whose every value is exactly a bfloat16, with the kernel built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.models.narrow_native import bf16_matmul, native_kernels_available


class WideningEmbedding(nn.Module):
    """Embedding lookup in a bfloat16 table; the gathered rows come out float32."""

    weight: torch.Tensor

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", table, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).float()


class Bf16TableHead(nn.Module):
    """Float32 logits from float32 hidden rows and the bfloat16 table (native kernel)."""

    table: torch.Tensor

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.out_features, self.in_features = table.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = bf16_matmul(flat, self.table)
        if y is None:  # the kernel went away (it is checked when the head is made): widen per call
            y = F.linear(flat.float(), self.table.float())
        return y.reshape(*x.shape[:-1], self.out_features)


def keep_tied_table_in_bf16(model: nn.Module) -> bool:
    """Swap a float32 tied table that holds only bfloat16 values for the bfloat16 pair above.
    Returns whether it did; the caller decides that the model is a quantized variant."""
    embedding = model.get_submodule("embed_tokens")
    if getattr(model, "lm_head", None) is not None or not isinstance(embedding, nn.Embedding):
        return False
    table = embedding.weight
    if table.dtype != torch.float32 or table.device.type != "cpu" or not native_kernels_available():
        return False
    narrow = table.detach().to(torch.bfloat16).contiguous()
    if not torch.equal(narrow.float(), table):  # not a bfloat16 checkpoint: keep every bit
        return False
    model.embed_tokens = WideningEmbedding(narrow)
    model.lm_head = Bf16TableHead(narrow)
    return True
