"""The compressed-tensors checkpoint layout, as far as tokenline writes and serves it.

A quantized linear ``X`` is stored as integer codes plus scales: ``X.weight``
(int8 codes, ``int-quantized``, for int8 weights with int8 activations) or
``X.weight_packed`` (weight-only int8 or int4 codes packed four or eight to an
int32, ``pack-quantized``), ``X.weight_scale`` (one per output row, or per
row and input group) and, packed only, ``X.weight_shape``. Codes are symmetric
(no zero point): ``w = code * scale``. The ``quantization_config`` in
``config.json`` says which scheme applies; modules named in ``ignore`` (the
``lm_head``) and every non-linear tensor stay in the source dtype.

A scheme may also target ``Embedding``: the embedding table is then int8 codes
(``model.embed_tokens.weight``) with one scale per vocabulary row, and so is the
``lm_head``; with tied embeddings the checkpoint holds only ``lm_head.weight_scale``
(transformers ties ``lm_head.weight`` to the embedding's codes and dequantizes each
module with its own scale). Such a checkpoint is ``int-quantized``: a packed
Embedding has no ``weight`` for transformers to initialise or tie (transformers 5.24
fails to load it), so the codes stay plain int8 for the layers' linears too.

Both the optimizer (writer) and the engine's loader (reader) use this module, so
the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.errors import InvalidParameterError

QUANT_METHOD = "compressed-tensors"
LINEAR_TARGETS = ("Linear",)
VOCAB_TARGETS = ("Linear", "Embedding")  # the layers' linears, the embedding table and the lm_head
INT_FORMAT = "int-quantized"
PACKED_FORMAT = "pack-quantized"
FLOAT_FORMAT = "float-quantized"
_INT4_PER_INT32 = 8


@dataclass(frozen=True)
class WeightScheme:
    """How the weights of every covered linear are quantized."""

    num_bits: int  # 8 or 4
    group_size: int | None  # None: one scale per output channel
    type: str = "int"  # "int" here; "float" for fp8 (written, not served on CPU)

    @property
    def max_code(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    @property
    def min_code(self) -> int:
        return -(1 << (self.num_bits - 1))


@dataclass(frozen=True)
class QuantScheme:
    """One checkpoint's quantization: weights, optional dynamic per-token int8 activations."""

    format: str
    weights: WeightScheme
    dynamic_int8_activations: bool
    ignore: tuple[str, ...]  # Hugging Face module names left in the source dtype
    targets: tuple[str, ...] = LINEAR_TARGETS  # or VOCAB_TARGETS

    def covers(self, module_name: str) -> bool:
        return module_name not in self.ignore

    @property
    def quantizes_vocab(self) -> bool:
        """True when the embedding table and the lm_head are int8 too (one scale per vocab row)."""
        return "Embedding" in self.targets


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes ``[out, in]`` (int8, also for 4-bit codes) and float32 scales.

    ``scale`` is ``[out, 1]`` per channel or ``[out, in // group_size]`` per group.
    Rows concatenate along dim 0 (fused q/k/v or gate/up) before a kernel packs them.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    num_bits: int
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:
        _out_features, in_features = self.shape
        repeat = in_features if self.group_size is None else self.group_size
        return self.codes.float() * self.scale.float().repeat_interleave(repeat, dim=1)

    @staticmethod
    def concat(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
        first = parts[0]
        if any(
            (p.num_bits, p.group_size, p.shape[1]) != (first.num_bits, first.group_size, first.shape[1])
            for p in parts
        ):
            raise InvalidParameterError("weights", [p.shape for p in parts], "fused parts differ in scheme")
        if len(parts) == 1:
            return first
        return QuantizedWeight(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            first.num_bits,
            first.group_size,
        )


def scheme_from_config(config: Mapping[str, Any]) -> QuantScheme | None:
    """The checkpoint's scheme, None for a dense checkpoint; a clear error for what we do not serve."""
    raw = config.get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or raw.get("quant_method") != QUANT_METHOD:
        method = raw.get("quant_method") if isinstance(raw, Mapping) else raw
        raise InvalidParameterError("quantization_config.quant_method", method, f"only {QUANT_METHOD!r}")
    fmt = raw.get("format")
    groups = raw.get("config_groups")
    if not isinstance(groups, Mapping) or len(groups) != 1:
        raise InvalidParameterError("quantization_config.config_groups", groups, "exactly one group")
    group = next(iter(groups.values()))
    targets = tuple(group.get("targets") or ())
    if targets not in (LINEAR_TARGETS, VOCAB_TARGETS):
        expected = f"{list(LINEAR_TARGETS)} or {list(VOCAB_TARGETS)}"
        raise InvalidParameterError("quantization_config.targets", group.get("targets"), expected)
    weights = group.get("weights") or {}
    if weights.get("type") != "int" or not weights.get("symmetric", False):
        raise InvalidParameterError("quantization_config.weights", weights, "only symmetric int weights")
    strategy, num_bits = weights.get("strategy"), weights.get("num_bits")
    if num_bits not in (4, 8):
        raise InvalidParameterError("quantization_config.weights.num_bits", num_bits, "only 4 or 8")
    activations = group.get("input_activations")
    # Weight-only schemes are packed into int32 (as llm-compressor writes W4A16/W8A16 and
    # transformers expects); int8 weights with int8 activations, and schemes that cover the
    # embedding table (see the module docstring), are stored as plain int8.
    expected_format = PACKED_FORMAT if activations is None and targets == LINEAR_TARGETS else INT_FORMAT
    if fmt != expected_format:
        raise InvalidParameterError("quantization_config.format", fmt, f"this scheme needs {expected_format}")
    group_size = weights.get("group_size") if strategy == "group" else None
    if strategy not in ("channel", "group") or (strategy == "group" and not isinstance(group_size, int)):
        raise InvalidParameterError("quantization_config.weights.strategy", strategy, "channel or group")
    if activations is not None and not (
        activations.get("num_bits") == 8
        and activations.get("type") == "int"
        and activations.get("strategy") == "token"
        and activations.get("dynamic") is True
        and activations.get("symmetric", False)
    ):
        raise InvalidParameterError(
            "quantization_config.input_activations", activations, "only dynamic symmetric per-token int8"
        )
    if targets == VOCAB_TARGETS and (num_bits, strategy, activations) != (8, "channel", None):
        # The engine serves the embedding table as int8 rows, and only for weight-only schemes.
        raise InvalidParameterError(
            "quantization_config.targets", list(targets), "Embedding only with weight-only int8 per channel"
        )
    ignore = raw.get("ignore") or []
    return QuantScheme(
        format=expected_format,
        weights=WeightScheme(int(num_bits), group_size),
        dynamic_int8_activations=activations is not None,
        ignore=tuple(str(name) for name in ignore),
        targets=targets,
    )


def quantization_config(scheme: QuantScheme) -> dict[str, Any]:
    """The ``config.json`` entry that transformers (through the compressed-tensors package) and vLLM read."""
    weights: dict[str, Any] = {
        "num_bits": scheme.weights.num_bits,
        "type": scheme.weights.type,
        "symmetric": True,
        "strategy": "channel" if scheme.weights.group_size is None else "group",
        "group_size": scheme.weights.group_size,
        "dynamic": False,
        "observer": "minmax",
    }
    activations = None
    if scheme.dynamic_int8_activations:
        activations = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
            "observer": None,
        }
    group: dict[str, Any] = {
        "targets": list(scheme.targets),
        "weights": weights,
        "input_activations": activations,
        "output_activations": None,
    }
    if scheme.quantizes_vocab:
        # Without it compressed-tensors infers pack-quantized for weight-only int8 (see module docstring).
        group["format"] = scheme.format
    return {
        "quant_method": QUANT_METHOD,
        "format": scheme.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(scheme.ignore),
        "kv_cache_scheme": None,
    }


def tensor_names(module: str, scheme: QuantScheme) -> tuple[str, ...]:
    """The safetensors names that hold one quantized linear (``module`` without ``.weight``)."""
    if scheme.format == PACKED_FORMAT:
        return (f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape")
    return (f"{module}.weight", f"{module}.weight_scale")


def encode(
    module: str, weight: QuantizedWeight, scheme: QuantScheme, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one quantized linear; scales are stored in the source ``dtype``."""
    scale = weight.scale.to(dtype).contiguous()
    if scheme.format == PACKED_FORMAT:
        return {
            f"{module}.weight_packed": pack_codes(weight.codes, weight.num_bits),
            f"{module}.weight_scale": scale,
            f"{module}.weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }
    return {f"{module}.weight": weight.codes.to(torch.int8).contiguous(), f"{module}.weight_scale": scale}


def decode(module: str, tensors: Mapping[str, torch.Tensor], scheme: QuantScheme) -> QuantizedWeight:
    """The inverse of :func:`encode`; shapes are checked so a wrong file gives a named error."""
    scale = tensors[f"{module}.weight_scale"].float()
    if scheme.format == PACKED_FORMAT:
        shape = tuple(int(v) for v in tensors[f"{module}.weight_shape"].tolist())
        codes = unpack_codes(tensors[f"{module}.weight_packed"], scheme.weights.num_bits, shape[1])
        if codes.shape[0] != shape[0]:
            raise InvalidParameterError(
                f"{module}.weight_packed", tuple(codes.shape), f"weight_shape {shape}"
            )
    else:
        codes = tensors[f"{module}.weight"]
        if codes.dtype != torch.int8:
            raise InvalidParameterError(f"{module}.weight", str(codes.dtype), "int-quantized needs int8")
    out_features, in_features = codes.shape
    group = scheme.weights.group_size
    expected = (out_features, 1 if group is None else in_features // group)
    if tuple(scale.shape) != expected or (group is not None and in_features % group):
        raise InvalidParameterError(f"{module}.weight_scale", tuple(scale.shape), f"expected {expected}")
    return QuantizedWeight(codes, scale, scheme.weights.num_bits, group)


def pack_codes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed codes [out, in] -> int32 [out, in * num_bits / 32]: offset to unsigned, lowest bits first."""
    out_features, in_features = codes.shape
    per_int32 = 32 // num_bits
    if in_features % per_int32:
        raise InvalidParameterError("in_features", in_features, f"packing needs a multiple of {per_int32}")
    unsigned = (codes.to(torch.int64) + (1 << (num_bits - 1))).view(out_features, -1, per_int32)
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int64)
    packed = (unsigned << shifts).sum(dim=-1)
    # Reinterpret the 32-bit pattern as a signed int32.
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32).contiguous()


def unpack_codes(packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int64)
    fields = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << num_bits) - 1)
    return (fields.reshape(packed.shape[0], -1)[:, :in_features] - (1 << (num_bits - 1))).to(torch.int8)
