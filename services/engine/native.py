"""The engine's native CPU kernels, built on first use.

- ``paged_decode.c``: decode attention reading the paged KV cache in place.
- ``narrow_matmul.c`` (+ ``narrow_int8.c``, ``narrow_int4.c``, ``narrow_bf16.c``, sharing
  ``narrow_matmul.h``): projections over int8, int4 or bfloat16 weights at memory speed on
  AVX2 (quantized variants), one library.
- ``rms_norm.c``: RMS normalisation of float32 rows in one call.
- ``rotary.c``: rotary position embedding of float32 heads in one call.

Each is plain C: the system C compiler builds it in well under a second into
``$XDG_CACHE_HOME/tokenline/kernels/`` (named by a hash of its sources, headers and flags, written
to a temporary file and renamed, so concurrent builders never see a partial library),
and ``ctypes`` calls it. ctypes releases the GIL for the call. Where no compiler is found
or the build fails, the kernel's getter returns None and its caller falls back to a
PyTorch path; the reason is logged once per kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)

# Fast math lets the compiler reassociate (vectorized dot products) and call glibc's vector
# expf; the kernel keeps every value finite, as that assumes (see paged_decode.c). It is a
# compile flag only: linked with -ffast-math, GCC adds crtfastmath.o, which on load switches
# the whole process to flush-to-zero / denormals-are-zero and so changes every float
# computation outside the kernel too (a sampler dividing by a denormal temperature got 0).
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-pthread"]
_LINK_FLAGS = ["-shared", "-pthread"]
_DISABLE_ENV = "TOKENLINE_NO_NATIVE_KERNELS"  # set to 1 to force the PyTorch paths
_I64 = ctypes.c_int64
_NARROW_SOURCES = ("narrow_matmul.c", "narrow_int8.c", "narrow_int4.c", "narrow_bf16.c")


def _cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "tokenline" / "kernels"


_P = ctypes.c_void_p


@functools.cache
def paged_decode_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled ``paged_decode_attention`` function, or None when it cannot be built."""
    argtypes = [
        _P, _I64, _P, _P, _P, _I64, _P, _P,
        _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    return _function("paged_decode", "decode attention", "paged_decode_attention", argtypes, ctypes.c_int)


@functools.cache
def rms_norm_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled ``rms_norm_rows`` function, or None when it cannot be built."""
    argtypes = [_P, _I64, _I64, _P, ctypes.c_float, _P]
    return _function("rms_norm", "RMS normalisation", "rms_norm_rows", argtypes, None)


@functools.cache
def rotary_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled ``rotate_heads`` function, or None when it cannot be built."""
    argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _P]
    return _function("rotary", "rotary embedding", "rotate_heads", argtypes, None)


def _function(
    stem: str, purpose: str, symbol: str, argtypes: list[Any], restype: Any
) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """``symbol`` of the one-source library ``<stem>.c``, typed, or None when it cannot be built."""
    handle = _library(stem, purpose)
    if handle is None:
        return None
    function = getattr(handle, symbol)
    function.argtypes = argtypes
    function.restype = restype
    return function


@functools.cache
def narrow_matmul_kernels() -> NarrowMatmulKernels | None:
    """The narrow-weight kernels (``narrow_matmul.c`` with ``narrow_int8.c``, ``narrow_int4.c``,
    ``narrow_bf16.c``, one library), or None when they cannot be built."""
    handle = _library("narrow_matmul", "int8, int4 and bfloat16 projections", _NARROW_SOURCES)
    if handle is None:
        return None
    pointer = ctypes.c_void_p
    int8 = handle.int8_weight_matmul
    int8.argtypes = [
        pointer, _I64, _I64, pointer, pointer, pointer, pointer, _I64, ctypes.c_int, ctypes.c_int
    ]  # fmt: skip
    int4 = handle.int4_weight_matmul
    int4.argtypes = [pointer, _I64, _I64, pointer, pointer, _I64, pointer, pointer, _I64, ctypes.c_int]
    bf16 = handle.bf16_weight_matmul
    bf16.argtypes = [pointer, _I64, _I64, pointer, pointer, pointer, _I64, ctypes.c_int]
    for function in (int8, int4, bf16):
        function.restype = ctypes.c_int
    return NarrowMatmulKernels(int8, int4, bf16)


class NarrowMatmulKernels(NamedTuple):
    int8: Any  # int8_weight_matmul: float32 x, quantized per row inside; int8 weight, row scales
    int4: Any  # int4_weight_matmul: float32 x, int4 nibbles with a scale per group of columns
    bf16: Any  # bf16_weight_matmul: float32 x, bfloat16 weight


def _library(stem: str, purpose: str, sources: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The library ``<stem>`` built from ``sources`` (default ``<stem>.c``) beside this file,
    once per content of its sources, the headers here and the flags, then loaded."""
    if os.environ.get(_DISABLE_ENV) == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found; %s use the PyTorch path", purpose)
        return None
    here = Path(__file__).parent
    files = [here / name for name in sources or (f"{stem}.c",)]
    content = b"".join(path.read_bytes() for path in [*files, *sorted(here.glob("*.h"))])
    digest = hashlib.sha256(content + " ".join(_COMPILE_FLAGS + _LINK_FLAGS).encode()).hexdigest()
    library = _cache_dir() / f"{stem}-{digest[:16]}.so"
    try:
        if not library.is_file():
            _build(compiler, files, library)
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:
        logger.warning("native %s unavailable (%s); using the PyTorch path", purpose, error)
        return None


def _build(compiler: str, sources: list[Path], library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{library.name}.", dir=library.parent)
    os.close(fd)
    objects = [f"{partial}.{index}.o" for index in range(len(sources))]
    try:
        for source, obj in zip(sources, objects, strict=True):
            command = [compiler, *_COMPILE_FLAGS, "-c", str(source), "-o", obj]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        link = [compiler, *_LINK_FLAGS, *objects, "-o", partial, "-lm"]
        subprocess.run(link, check=True, capture_output=True, timeout=120)
        os.replace(partial, library)
    finally:
        for leftover in (partial, *objects):
            if os.path.exists(leftover):
                os.unlink(leftover)


def supports(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
