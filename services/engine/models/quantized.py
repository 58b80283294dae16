"""Quantized linear layers that run native kernels on the packed weight, never a dequantized copy.

* :class:`Int8WeightOnlyLinear` — int8 weight, float activations, per-channel scales: the
  native kernel of ``narrow_native`` (memory speed on AVX2), else ``aten._weight_int8pack_mm``.
* :class:`W8A8Linear` — activations quantized per token to int8 on the fly, then
  ``torch._int_mm`` (int8 x int8 -> int32) on CPUs with VNNI/AMX, else the native kernel of
  ``narrow_native`` over the integer codes (or ``_weight_int8pack_mm`` without it).
* :class:`Int4Linear` — our kernel on its own nibble layout (``narrow_native``), else
  ``aten._weight_int4pack_mm_for_cpu`` on the CPU tile layout made by
  ``aten._convert_weight_to_int4pack_for_cpu``; that kernel computes ``(u - 8) * scale + zero``
  per group for unsigned nibbles ``u``, so symmetric codes ``c`` go in as ``c + 8`` with zero 0.

Each is built from a :class:`QuantizedWeight` whose rows may be the concatenation
of several checkpoint linears (fused q/k/v, gate/up): rows are joined first, the
kernel layout is made once, at load time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.models.compressed import QuantizedWeight, QuantScheme, decode, tensor_names
from services.engine.models.llama import WeightSource
from services.engine.models.narrow_native import (
    INT8_LEVELS,
    int4_matmul,
    int8_matmul,
    native_kernels_available,
    pack_int4_codes,
)
from services.errors import InvalidParameterError

# The CPU kernels of _weight_int8pack_mm and _weight_int4pack_mm_for_cpu are vectorized for
# bfloat16 activations; with float32 activations they fall back to scalar loops (~15x slower on
# this AVX2 CPU). So the quantized matmuls run in bfloat16 whatever the engine's dtype.
KERNEL_DTYPE = torch.bfloat16


class QuantizedLinear(nn.Module):
    """Common part: shapes, optional float bias, the dtype the engine runs in."""

    bias: torch.Tensor | None

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [rows, in_features]; the engine's flat batch already is."""
        return x if x.dim() == 2 else x.reshape(-1, self.in_features)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        if x.dim() != 2:  # the engine's flat batch is already [tokens, features]
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8WeightOnlyLinear(QuantizedLinear):
    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(weight, bias, dtype)
        self.register_buffer("codes", weight.codes.to(torch.int8).contiguous(), persistent=False)
        # The native kernel takes float32 scales, the torch kernel bfloat16 ones (its fast path).
        self.native = native_kernels_available()
        scale_dtype = torch.float32 if self.native else KERNEL_DTYPE
        self.register_buffer("scale", weight.scale.reshape(-1).to(scale_dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        y = int8_matmul(flat, self.codes, self.scale) if self.native else None
        if y is None:  # no kernel, or non-finite activations the kernel cannot quantize
            y = torch.ops.aten._weight_int8pack_mm(
                flat.to(KERNEL_DTYPE), self.codes, self.scale.to(KERNEL_DTYPE)
            )
        return self._finish(y, x)


class W8A8Linear(QuantizedLinear):
    """Activations quantized per token to int8, times int8 weights, token and channel scales after.

    Three native paths compute the same integer products: ``torch._int_mm`` (int8 x int8 ->
    int32) where the CPU has int8 dot-product instructions (VNNI/AMX); otherwise our int8
    kernel (``narrow_native.int8_matmul`` with int8 activation levels: it quantizes the rows
    itself and sums the products in int32 lanes); and without it ``_weight_int8pack_mm`` over
    the activation codes held exactly in bfloat16 (integers up to 127 are exact there; that
    kernel rounds its output to bfloat16).
    Without VNNI, ``_int_mm`` measured ~10x slower than the float32 matmul on this AVX2 CPU.
    """

    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        use_int_mm: bool | None = None,
    ) -> None:
        super().__init__(weight, bias, dtype)
        self.use_int_mm = cpu_has_int8_dot_product() if use_int_mm is None else use_int_mm
        self.native = not self.use_int_mm and native_kernels_available()
        self.register_buffer("codes", weight.codes.to(torch.int8).contiguous(), persistent=False)
        scale = weight.scale.reshape(-1)
        # Float32 for _int_mm (applied after) and our kernel; int8pack takes them in bfloat16.
        scale_dtype = torch.float32 if self.use_int_mm or self.native else KERNEL_DTYPE
        self.register_buffer("scale", scale.to(scale_dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        # Our kernel quantizes each row to int8 codes itself (as quantize_per_token does).
        y = int8_matmul(flat, self.codes, self.scale, INT8_LEVELS) if self.native else None
        if y is None:
            y = self._scaled_products(*quantize_per_token(flat.float()))
        return self._finish(y, x)

    def _scaled_products(self, x_codes: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        if self.use_int_mm:
            # A transposed view of the row-major codes is what _int_mm's CPU path reads fastest.
            return torch._int_mm(x_codes, self.codes.t()).float() * self.scale * x_scale
        by_codes: torch.Tensor = torch.ops.aten._weight_int8pack_mm(
            x_codes.to(KERNEL_DTYPE), self.codes, self.scale.to(KERNEL_DTYPE)
        )
        return by_codes.float() * x_scale


class Int4Linear(QuantizedLinear):
    """Group-wise int4: our kernel (``narrow_native.int4_matmul``) on its own nibble layout
    where it is built and the groups are whole 32-column chunks, else torch's CPU int4 kernel."""

    nibbles: torch.Tensor
    group_scale: torch.Tensor

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(weight, bias, dtype)
        if weight.group_size is None:
            raise InvalidParameterError("group_size", None, "int4 weights need a group size")
        self.group_size = weight.group_size
        self.native = native_kernels_available() and self.group_size % 32 == 0
        if self.native:
            self.register_buffer("nibbles", pack_int4_codes(weight.codes), persistent=False)
            self.register_buffer("group_scale", weight.scale.float().contiguous(), persistent=False)
            return
        unsigned = (weight.codes.to(torch.int32) + 8).contiguous()
        # innerKTiles only has to divide in_features / 16 on CPU; 1 always does.
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        self.register_buffer("packed", packed, persistent=False)
        scale = weight.scale.t().to(KERNEL_DTYPE)  # [groups, out]
        scale_and_zero = torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()
        self.register_buffer("scale_and_zero", scale_and_zero, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        if self.native:
            y = int4_matmul(flat, self.nibbles, self.group_scale, self.group_size)
            if y is None:  # activations that are not finite: as a float matmul would take them
                y = F.linear(flat.float(), self._dequantized())
            return self._finish(y, x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(KERNEL_DTYPE), self.packed, self.group_size, self.scale_and_zero
        )
        return self._finish(y, x)

    def _dequantized(self) -> torch.Tensor:
        chunks = self.nibbles.reshape(self.out_features, self.in_features // 32, 1, 16)
        unsigned = torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(self.out_features, self.in_features)
        codes = unsigned.to(torch.int16) - 8
        return codes.float() * self.group_scale.repeat_interleave(self.group_size, dim=1)


def cpu_has_int8_dot_product() -> bool:
    """True when the CPU advertises VNNI or AMX int8 (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row and the float32 row scales [rows, 1]."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    codes = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale


def build_quantized_linear(
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    device: torch.device,
    dtype: torch.dtype,
) -> QuantizedLinear:
    """The kernel-backed module for one (possibly fused) quantized projection."""
    if device.type != "cpu":
        raise InvalidParameterError("device", str(device), "quantized checkpoints are served on CPU only")
    if scheme.weights.num_bits == 4:
        return Int4Linear(weight, bias, dtype)
    if scheme.dynamic_int8_activations:
        return W8A8Linear(weight, bias, dtype)
    return Int8WeightOnlyLinear(weight, bias, dtype)


def swap_in_quantized(
    model: nn.Module,
    layout: dict[str, WeightSource],
    scheme: QuantScheme,
    checkpoint: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, WeightSource], set[str]]:
    """Replace every covered projection of ``model`` (still on meta) by its kernel-backed module.

    Returns the layout of the parameters left for the dense loader and the checkpoint
    names the quantized modules consumed. Fused projections join their parts' rows.
    """
    remaining = dict(layout)
    consumed: set[str] = set()
    for param_name, source in layout.items():
        module_path = param_name.removesuffix(".weight")
        hf_modules = [name.removesuffix(".weight") for name in source.names]
        if not param_name.endswith(".weight") or not all(
            name.endswith("_proj") and scheme.covers(name) for name in hf_modules
        ):
            continue
        parts = []
        for hf_module, rows in zip(hf_modules, source.rows, strict=True):
            names = tensor_names(hf_module, scheme)
            missing = [name for name in names if name not in checkpoint]
            if missing:
                raise InvalidParameterError(
                    "model_dir", missing[0], "quantized tensor missing from the checkpoint"
                )
            part = decode(hf_module, {name: checkpoint[name].get_tensor(name) for name in names}, scheme)
            if part.shape[0] != rows:
                raise InvalidParameterError(names[0], part.shape, f"expected {rows} output rows")
            parts.append(part)
            consumed.update(names)
        bias = None
        bias_source = remaining.pop(f"{module_path}.bias", None)
        if bias_source is not None:
            bias = torch.cat([checkpoint[name].get_tensor(name) for name in bias_source.names])
            consumed.update(bias_source.names)
        del remaining[param_name]
        parent_path, _, attribute = module_path.rpartition(".")
        module = build_quantized_linear(QuantizedWeight.concat(parts), bias, scheme, device, dtype)
        setattr(model.get_submodule(parent_path), attribute, module)
    return remaining, consumed
