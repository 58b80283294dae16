"""The native matmuls over narrow weights (``services/engine/narrow_*.c``) as tensor functions.

- :func:`int8_matmul`: float rows, quantized per row inside the kernel, to int16 for
  weight-only int8 (see the C file for why that is finer than the bfloat16 activations of
  ``aten._weight_int8pack_mm``) or to int8 codes for w8a8; the products are exact integers.
- :func:`int4_matmul`: float rows (to int16 inside) times group-wise int4 codes.
- :func:`bf16_matmul`: float rows times a bfloat16 weight, in float32.

The int8 ones run the products on integers; all read the weight at memory speed. Callers
keep a PyTorch path: each returns None where the kernel cannot serve a call (not built; for
float rows into int8, a row of ``x`` that is not finite).
"""

from __future__ import annotations

from typing import Any

import torch

from services.engine import native

INT16_LEVELS = 32767  # weight-only int8: activations at int16 precision
INT8_LEVELS = 127  # w8a8: activations as int8 codes
_OK = 0
_NO_MEMORY = 2
_NOT_FINITE = 3


def native_kernels_available() -> bool:
    return native.narrow_matmul_kernels() is not None


def int8_matmul(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, activation_levels: int = INT16_LEVELS
) -> torch.Tensor | None:
    """``x @ (codes * scale[:, None]).T`` in float32, for ``x`` [rows, in] and int8 ``codes``
    [out, in] with float32 ``scale`` [out]. Each row of ``x`` is quantized inside the kernel
    to ``activation_levels`` symmetric steps: :data:`INT16_LEVELS` (weight-only int8, finer
    than bfloat16) or :data:`INT8_LEVELS` (w8a8's per-token int8 codes). None where the
    native kernel cannot serve the call (not built, or a row of ``x`` is not finite)."""
    kernels = native.narrow_matmul_kernels()
    if kernels is None:
        return None
    out_features, in_features = codes.shape
    weight = (codes.data_ptr(), scale.data_ptr(), None)
    y, status = _launch(kernels.int8, x, in_features, out_features, weight, (activation_levels,))
    return None if status == _NOT_FINITE else _checked(y, status, x.shape[0], in_features)


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """Int4 codes [out, in] (int8 values in [-8, 7], ``in`` a multiple of 32) as the kernel's
    nibbles [out, in // 2] uint8: in each 32-column chunk, byte j holds column j + 8 in its low
    nibble and column 16 + j + 8 in its high one (so one mask and one shift unpack a chunk)."""
    out_features, in_features = codes.shape
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(out_features, in_features // 32, 2, 16)
    return (
        (unsigned[:, :, 0, :] | (unsigned[:, :, 1, :] << 4))
        .reshape(out_features, in_features // 2)
        .contiguous()
    )


def int4_matmul(
    x: torch.Tensor, nibbles: torch.Tensor, group_scale: torch.Tensor, group_size: int
) -> torch.Tensor | None:
    """``x @ W.T`` in float32 for the int4 weight ``W`` in :func:`pack_int4_codes`'s layout with
    float32 ``group_scale`` [out, in // group_size]; None where the native kernel cannot serve
    the call (not built, or a row of ``x`` is not finite)."""
    kernels = native.narrow_matmul_kernels()
    if kernels is None:
        return None
    out_features, in_features = nibbles.shape[0], 2 * nibbles.shape[1]
    weight = (nibbles.data_ptr(), group_scale.data_ptr(), group_size, None)
    y, status = _launch(kernels.int4, x, in_features, out_features, weight)
    return None if status == _NOT_FINITE else _checked(y, status, x.shape[0], in_features)


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` in float32 for float rows ``x`` [rows, in] and a bfloat16 ``weight``
    [out, in] (contiguous); None where the native kernel is not built."""
    kernels = native.narrow_matmul_kernels()
    if kernels is None:
        return None
    out_features, in_features = weight.shape
    y, status = _launch(kernels.bf16, x, in_features, out_features, (weight.data_ptr(), None))
    return _checked(y, status, x.shape[0], in_features)


def _launch(
    kernel: Any,
    x: torch.Tensor,
    in_features: int,
    out_features: int,
    weight: tuple[int | None, ...],
    options: tuple[int, ...] = (),
) -> tuple[torch.Tensor, int]:
    """A float32 output [rows, out_features] filled by ``kernel`` over a contiguous float32
    ``x``, and the kernel's status. Every narrow kernel takes ``(x, rows, in_features, *weight,
    y, out_features, threads, *options)``: ``weight`` holds its weight's pointers and shape
    arguments (and the bias, None here)."""
    rows = x.shape[0]
    y = torch.empty((rows, out_features), dtype=torch.float32)
    if rows == 0:
        return y, _OK
    # Checked here rather than converted unconditionally: a decode step makes ~120 of these
    # calls, and each avoided dispatch is a microsecond of every one.
    flat = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    threads = torch.get_num_threads()
    status: int = kernel(
        flat.data_ptr(), rows, in_features, *weight, y.data_ptr(), out_features, threads, *options
    )  # flat is alive until the kernel returns
    return y, status


def _checked(y: torch.Tensor, status: int, rows: int, in_features: int) -> torch.Tensor:
    if status == _NO_MEMORY:
        raise MemoryError(f"narrow matmul: no memory to quantize {rows} x {in_features} activations")
    if status != _OK:
        raise RuntimeError(f"narrow matmul rejected its arguments (status {status})")
    return y
