"""The vocabulary matrices as int8 rows: the embedding lookup and the ``lm_head`` logits.

For a checkpoint whose scheme targets ``Embedding`` (recipe ``int8-all``; layout in
``compressed.py``) the table is int8 codes ``[vocab, hidden]`` with one scale per row.

* :class:`Int8Embedding` gathers the int8 rows of the step's tokens and scales only those;
  the table itself is never widened.
* The ``lm_head`` is an :class:`Int8WeightOnlyLinear` (native int8 kernel), so the
  logits matmul reads int8 instead of float32. With tied embeddings it holds the very tensor
  of the table's codes (no second copy) and the checkpoint's ``lm_head.weight_scale``, which
  is how transformers computes the tied head of such a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from services.engine.models.compressed import QuantizedWeight, QuantScheme, decode, tensor_names
from services.engine.models.llama import LlamaFamilyModel, WeightSource
from services.engine.models.quantized import build_quantized_linear
from services.engine.models.spec import ModelSpec
from services.errors import InvalidParameterError

EMBEDDING, LM_HEAD = "model.embed_tokens", "lm_head"  # Hugging Face module names


class Int8Embedding(nn.Module):
    """``embedding[ids] = codes[ids] * scale[ids]``, computed for the looked-up rows only."""

    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, table: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        if table.num_bits != 8 or table.group_size is not None:
            found = (table.num_bits, table.group_size)
            raise InvalidParameterError(EMBEDDING, found, "int8 codes, one scale per row")
        self.num_embeddings, self.embedding_dim = table.shape
        self.dtype = dtype
        self.register_buffer("codes", table.codes.to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("scale", table.scale.reshape(-1, 1).float().contiguous(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self.codes.index_select(0, flat).float() * self.scale.index_select(0, flat)
        return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def swap_in_quantized_vocab(
    model: LlamaFamilyModel,
    layout: dict[str, WeightSource],
    scheme: QuantScheme,
    checkpoint: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, WeightSource], set[str]]:
    """Replace ``embed_tokens`` and set ``lm_head`` from the int8 table (and head, if untied).

    Returns the layout left for the dense loader and the checkpoint names consumed here.
    """
    spec = model.spec
    remaining = dict(layout)
    consumed: set[str] = set()
    table = _read(EMBEDDING, scheme, checkpoint, spec, consumed)
    del remaining["embed_tokens.weight"]
    if spec.tie_word_embeddings:
        name = f"{LM_HEAD}.weight_scale"
        if name not in checkpoint:
            raise InvalidParameterError("model_dir", name, "a tied int8 lm_head needs its scale")
        scale = checkpoint[name].get_tensor(name).float()
        if tuple(scale.shape) != (spec.vocab_size, 1):
            raise InvalidParameterError(name, tuple(scale.shape), f"expected {(spec.vocab_size, 1)}")
        consumed.add(name)
        head = QuantizedWeight(table.codes, scale, 8, None)  # the table's own codes tensor
    else:
        head = _read(LM_HEAD, scheme, checkpoint, spec, consumed)
        del remaining["lm_head.weight"]
    model.lm_head = build_quantized_linear(head, None, scheme, device, dtype)
    model.embed_tokens = Int8Embedding(table, dtype)
    return remaining, consumed


def _read(
    module: str, scheme: QuantScheme, checkpoint: Mapping[str, Any], spec: ModelSpec, consumed: set[str]
) -> QuantizedWeight:
    names = tensor_names(module, scheme)
    missing = [name for name in names if name not in checkpoint]
    if missing:
        raise InvalidParameterError("model_dir", missing[0], "quantized tensor missing from the checkpoint")
    weight = decode(module, {name: checkpoint[name].get_tensor(name) for name in names}, scheme)
    if weight.shape != (spec.vocab_size, spec.hidden_size):
        raise InvalidParameterError(names[0], weight.shape, f"expected {(spec.vocab_size, spec.hidden_size)}")
    consumed.update(names)
    return weight
