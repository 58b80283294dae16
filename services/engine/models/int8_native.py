"""The native int8-weight matmuls (``services/engine/int8_matmul.c``) as tensor functions.

- :func:`int8_matmul`: float rows, quantized to int16 inside the kernel (see the C file for
  why that is finer than the bfloat16 activations of ``aten._weight_int8pack_mm``).
- :func:`int8_matmul_codes`: rows already quantized (w8a8's int8 codes and their scales), so
  every product is an exact integer.

Both run the products on integers at memory speed. Callers keep a PyTorch path: each
returns None where the kernel cannot serve a call (not built; for float rows, a row of
``x`` that is not finite).
"""

from __future__ import annotations

import torch

from services.engine import native

_OK = 0
_NO_MEMORY = 2
_NOT_FINITE = 3


def native_int8_available() -> bool:
    return native.int8_matmul_kernels() is not None


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``x @ (codes * scale[:, None]).T`` in float32, for ``x`` [rows, in] and int8 ``codes``
    [out, in] with float32 ``scale`` [out]; None where the native kernel cannot serve it."""
    kernels = native.int8_matmul_kernels()
    if kernels is None:
        return None
    rows, out_features, in_features = x.shape[0], codes.shape[0], codes.shape[1]
    if rows == 0:
        return x.new_empty((0, out_features), dtype=torch.float32)
    flat = x.to(torch.float32).contiguous()
    y = torch.empty((rows, out_features), dtype=torch.float32)
    status = kernels.float_rows(
        flat.data_ptr(), rows, in_features, codes.data_ptr(), scale.data_ptr(), None, y.data_ptr(),
        out_features, torch.get_num_threads(),
    )  # fmt: skip
    return None if status == _NOT_FINITE else _checked(y, status, rows, in_features)


def int8_matmul_codes(
    x_codes: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor | None:
    """``(x_codes * x_scale) @ (codes * scale[:, None]).T`` in float32 for integer activation
    codes [rows, in] (|code| < 2^15) with float32 row scales [rows] or [rows, 1]."""
    kernels = native.int8_matmul_kernels()
    if kernels is None:
        return None
    rows, out_features, in_features = x_codes.shape[0], codes.shape[0], codes.shape[1]
    if rows == 0:
        return x_codes.new_empty((0, out_features), dtype=torch.float32)
    widened = x_codes.to(torch.int16).contiguous()
    row_scale = x_scale.reshape(rows).to(torch.float32).contiguous()
    y = torch.empty((rows, out_features), dtype=torch.float32)
    status = kernels.quantized_rows(
        widened.data_ptr(), row_scale.data_ptr(), rows, in_features, codes.data_ptr(), scale.data_ptr(), None,
        y.data_ptr(), out_features, torch.get_num_threads(),
    )  # fmt: skip
    return _checked(y, status, rows, in_features)


def _checked(y: torch.Tensor, status: int, rows: int, in_features: int) -> torch.Tensor:
    if status == _NO_MEMORY:
        raise MemoryError(f"int8 matmul: no memory for the int16 copy of {rows} x {in_features} activations")
    if status != _OK:
        raise RuntimeError(f"int8 matmul rejected its arguments (status {status})")
    return y
