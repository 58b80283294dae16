"""Float32 projections on CPU through oneDNN, with each weight reordered once at load.

``F.linear`` on CPU runs MKL's sgemm, which copies panels of the weight into its own
layout on every call. At the row counts of a decode step that shows: on this machine's
AVX2 core, oneDNN's inner product over a weight already in its blocked layout runs
SmolLM2's projections 1.1-1.5x faster than ``F.linear`` from 2 to 24 rows and its
49152-row output projection 1.5-2.4x faster up to 128 rows. It is level or up to ~14%
slower at prefill-sized chunks (128-512 rows), and 0.6-0.95x at one row, where a call's
fixed cost dominates (~25 us through oneDNN against ~3 us for ``F.linear``). Decode steps
have the small row counts, so the engine packs every float32 projection when the model is
loaded on a CPU (``prepack_linears``).

The packed tensor replaces the plain weight (no extra memory), except for a tied output
projection: the embedding lookup still needs the plain table, so the packed head is a
second copy of it (113 MB for SmolLM2 in float32). ``TOKENLINE_NO_PACKED_GEMM=1`` keeps
every weight plain. The packed layout is PyTorch's own (``torch.ops.mkldnn``, what
inductor's CPU linear fusion uses); results differ from ``F.linear`` only in the order of
float32 accumulation (~1e-6 relative).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from services.engine.models.layers import Linear

# oneDNN picks the blocked layout for this many rows; any row count then works. 16 is a
# decode step's typical batch here; hints of 1, 32, 128 and 512 measured no better.
PACKING_ROWS_HINT = 16
_DISABLE_ENV = "TOKENLINE_NO_PACKED_GEMM"


class PackedLinear(nn.Module):
    """``y = x W^T (+ b)`` with ``W`` held in oneDNN's blocked layout (float32, CPU)."""

    packed_weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        # Buffers, so that what the model holds is counted like any weight; not persistent:
        # the layout belongs to this process's oneDNN, never to a saved state dict.
        self.register_buffer("packed_weight", packed_weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.out_features, self.in_features = packed_weight.shape

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=PACKING_ROWS_HINT)
        return cls(packed, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half-precision activations meet float32 weights (see loader.matmul_dtype).
        widened = x if x.dtype == torch.float32 else x.float()
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            widened, self.packed_weight, self.bias, "none", [], ""
        )
        return out if out.dtype == x.dtype else out.to(x.dtype)


def packing_applies(device: torch.device, matmul_dtype: torch.dtype) -> bool:
    """Whether a model loaded on ``device`` with float32 projections gets packed weights."""
    return (
        device.type == "cpu"
        and matmul_dtype == torch.float32
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and os.environ.get(_DISABLE_ENV) != "1"
    )


def prepack_linears(model: nn.Module, tied_head_weight: torch.Tensor | None) -> int:
    """Replace every float32 :class:`Linear` under ``model`` by a :class:`PackedLinear`;
    with ``tied_head_weight`` also give the model a packed ``lm_head`` made from it.
    Returns the number of layers packed."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear) and child.weight.dtype == torch.float32
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear.pack(child.weight, child.bias))
    if tied_head_weight is not None:
        model.lm_head = PackedLinear.pack(tied_head_weight, None)
    return len(targets) + (tied_head_weight is not None)
