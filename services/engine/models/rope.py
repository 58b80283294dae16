"""Rotary position embeddings (RoPE) as the Llama family applies them.

Hugging Face checkpoints describe RoPE in one of two spellings: newer
``transformers`` writes a ``rope_parameters`` dict (holding ``rope_theta``),
older ones write a top-level ``rope_theta`` plus an optional ``rope_scaling``
dict. :func:`rope_spec_from_config` reads both into one :class:`RopeSpec`.

Rotation uses the "rotate half" layout of the Hugging Face Llama code: the
first and second halves of each head vector form the (real, imaginary) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.engine import native
from services.errors import InvalidParameterError

DEFAULT_ROPE_THETA = 10_000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """How rotary frequencies are derived. Fields unused by ``rope_type`` keep their defaults."""

    theta: float = DEFAULT_ROPE_THETA
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 0  # llama3 only


def rope_spec_from_config(config: Mapping[str, Any]) -> RopeSpec:
    """Reads ``rope_parameters`` (new spelling) or ``rope_theta`` + ``rope_scaling`` (old spelling)."""
    parameters = config.get("rope_parameters")
    if parameters is not None:
        field = "rope_parameters"
        # Per-layer-type RoPE (a dict of dicts) belongs to other model families.
        if not isinstance(parameters, Mapping) or not {"rope_type", "type"} & parameters.keys():
            raise InvalidParameterError(field, parameters, "expected one dict with a 'rope_type' key")
        theta = parameters.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    else:
        field = "rope_scaling"
        parameters = config.get("rope_scaling") or {}
        theta = config.get("rope_theta", DEFAULT_ROPE_THETA)
    if not isinstance(parameters, Mapping):
        raise InvalidParameterError(field, parameters, "expected a dict")
    theta = _require_positive(f"{field}.rope_theta", theta)

    partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise InvalidParameterError(f"{field}.partial_rotary_factor", partial, "only 1.0 is supported")

    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "default":
        return RopeSpec(theta=theta)
    if rope_type == "linear":
        factor = _require_positive(f"{field}.factor", parameters.get("factor"))
        return RopeSpec(theta=theta, rope_type="linear", factor=factor)
    if rope_type == "llama3":
        low = _require_positive(f"{field}.low_freq_factor", parameters.get("low_freq_factor"))
        high = _require_positive(f"{field}.high_freq_factor", parameters.get("high_freq_factor"))
        if high <= low:
            raise InvalidParameterError(f"{field}.high_freq_factor", high, "must exceed low_freq_factor")
        original = parameters.get("original_max_position_embeddings")
        if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
            raise InvalidParameterError(
                f"{field}.original_max_position_embeddings", original, "must be a positive integer"
            )
        return RopeSpec(
            theta=theta,
            rope_type="llama3",
            factor=_require_positive(f"{field}.factor", parameters.get("factor")),
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original,
        )
    raise InvalidParameterError(
        f"{field}.rope_type", rope_type, f"unsupported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def inverse_frequencies(spec: RopeSpec, head_dim: int, device: torch.device) -> torch.Tensor:
    """The ``head_dim / 2`` rotation speeds, in float32, after the spec's scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        return _llama3_scaled(inv_freq, spec)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    # Llama 3.1 context extension: wavelengths longer than the original context are
    # slowed by `factor`, short ones are kept, and the band in between is blended.
    context = spec.original_max_position_embeddings
    low_freq_wavelen = context / spec.low_freq_factor
    high_freq_wavelen = context / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (context / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Turns token positions into the cos/sin tables that :func:`apply_rotary` consumes."""

    inv_freq: torch.Tensor

    def __init__(self, spec: RopeSpec, head_dim: int, device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("inv_freq", inverse_frequencies(spec, head_dim, device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [T] int64 -> (cos, sin), each [T, 1, head_dim / 2] in ``dtype``.

        Angles are computed in float32 whatever the model dtype: bf16 cannot
        represent ``position * frequency`` for positions beyond a few hundred.
        """
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` [T, heads, head_dim] by the per-token angles; returns a new contiguous tensor."""
    tokens, heads, head_dim = x.shape
    kernel = native.rotary_kernel()
    if (
        kernel is not None
        and x.dtype == cos.dtype == sin.dtype == torch.float32
        and x.is_cpu
        and x.stride(2) == 1
        and x.stride(1) == head_dim  # heads adjacent within a token (a slice of the fused q/k/v)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and not x.requires_grad
    ):
        # One native call instead of eight operators (see rotary.c).
        out = torch.empty((tokens, heads, head_dim), dtype=torch.float32)
        kernel(
            x.data_ptr(), tokens, heads, head_dim, x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr()
        )
        return out
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _require_positive(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParameterError(field, value, "must be a positive number")
    return float(value)
