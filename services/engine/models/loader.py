"""Loads a Hugging Face checkpoint directory straight into :class:`LlamaFamilyModel`.

Reads ``config.json``, ``generation_config.json`` (optional) and the
safetensors weights (one file, or shards listed by
``model.safetensors.index.json``) without instantiating any ``transformers``
model. Every expected tensor must be present with the expected shape, and
every tensor present must be used: a silently dropped weight (a bias the
config does not announce, say) would serve wrong outputs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from services.engine.models.compressed import scheme_from_config
from services.engine.models.cpu_gemm import packing_applies, prepack_linears
from services.engine.models.half_vocab import keep_tied_table_in_bf16
from services.engine.models.layers import Linear
from services.engine.models.llama import LlamaFamilyModel, WeightSource, checkpoint_layout
from services.engine.models.manifest import verify_manifest
from services.engine.models.quantized import swap_in_quantized
from services.engine.models.quantized_vocab import swap_in_quantized_vocab
from services.engine.models.rope import RotaryEmbedding
from services.engine.models.spec import ModelSpec, spec_from_config
from services.errors import InvalidParameterError

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # recomputed from the config; old checkpoints saved it
_NAMES_SHOWN = 5

Checkpoint = Mapping[str, Any]  # tensor name -> the open safetensors file that holds it


def load_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[LlamaFamilyModel, ModelSpec]:
    """Builds the model on ``device`` with every weight in ``dtype``; returns it with its spec."""
    started = time.monotonic()
    model_dir = Path(model_dir)
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidParameterError("dtype", dtype, f"supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    config = _read_json(model_dir / "config.json", required=True)
    spec = spec_from_config(config, _read_json(model_dir / "generation_config.json", required=False))
    # A quantized variant (compressed-tensors) gets kernel-backed projections; see quantized.py.
    scheme = scheme_from_config(config)
    if scheme is not None:
        verify_manifest(model_dir)
    rotary = RotaryEmbedding(spec.rope, spec.head_dim, device)
    with torch.device("meta"):
        model = LlamaFamilyModel(spec, rotary)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}

    layout = checkpoint_layout(spec)
    linear_dtype = matmul_dtype(dtype, device)
    with _open_checkpoint(model_dir) as checkpoint:
        consumed: set[str] = set()
        if scheme is not None:
            layout, consumed = swap_in_quantized(model, layout, scheme, checkpoint, device, dtype)
        if scheme is not None and scheme.quantizes_vocab:
            layout, vocab_names = swap_in_quantized_vocab(model, layout, scheme, checkpoint, device, dtype)
            consumed |= vocab_names
        _check_names(layout, checkpoint, spec, model_dir, consumed)
        state = {
            name: _assemble(
                source, shapes[name], checkpoint, device, linear_dtype if _is_projection(name) else dtype
            )
            for name, source in layout.items()
        }
    model.load_state_dict(state, strict=True, assign=True)
    if spec.tie_word_embeddings and model.lm_head is None and linear_dtype != dtype:
        # The tied output projection reads the embedding table: give it a float32 copy.
        model.lm_head = Linear(spec.hidden_size, spec.vocab_size, False)
        model.lm_head.weight = torch.nn.Parameter(
            model.embed_tokens.get_parameter("weight").to(linear_dtype), requires_grad=False
        )
    model.eval()
    parameters = sum(param.numel() for param in model.parameters())
    packed = 0
    # A variant's tied bfloat16 table stays bfloat16 on a float32 engine (see half_vocab.py).
    narrow_table = scheme is not None and dtype == torch.float32 and keep_tied_table_in_bf16(model)
    if packing_applies(device, linear_dtype):
        # Here a missing lm_head means a float32 table that compute_logits reads (tied). Its
        # packed copy is a second table in memory: a quantized variant, made to be small,
        # keeps reading the one table instead.
        tied = model.lm_head is None and scheme is None
        packed = prepack_linears(model, model.embed_tokens.get_parameter("weight") if tied else None)
    logger.info(
        "model loaded",
        extra={
            "model_dir": str(model_dir),
            "architecture": spec.architecture,
            "num_layers": spec.num_layers,
            "parameters": parameters,
            "packed_linears": packed,
            "bf16_tied_table": narrow_table,
            "dtype": str(dtype),
            "matmul_dtype": str(linear_dtype),
            "device": str(device),
            "load_seconds": round(time.monotonic() - started, 3),
        },
    )
    return model, spec


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the projection weights are held in.

    ``dtype`` itself where the hardware multiplies it natively (any accelerator; a CPU
    with AVX-512 BF16 or AMX). On a CPU without (AVX2 only, as here) PyTorch's
    half-precision GEMM falls back to a scalar path about ten times slower than float32,
    so the weights are widened to float32 (exactly: every half-precision value is a
    float32 value) and each projection's output is rounded back to ``dtype``.
    """
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    native_half = torch.cpu._is_amx_tile_supported() or (
        dtype == torch.bfloat16 and torch.cpu._is_avx512_bf16_supported()
    )
    return dtype if native_half else torch.float32


def _is_projection(name: str) -> bool:
    return name.endswith(("_proj.weight", "_proj.bias", "lm_head.weight"))


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise InvalidParameterError("model_dir", str(path.parent), f"no {path.name} in the directory")
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidParameterError("model_dir", str(path), f"unreadable JSON: {error}") from error
    if not isinstance(content, dict):
        raise InvalidParameterError("model_dir", str(path), "expected a JSON object")
    return content


@contextmanager
def _open_checkpoint(model_dir: Path) -> Iterator[Checkpoint]:
    """Opens every safetensors file once (memory-mapped) and maps each tensor name to its file."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InvalidParameterError("model_dir", str(index), "index has no 'weight_map' object")
        files = sorted({model_dir / str(file) for file in weight_map.values()})
    elif (model_dir / _SINGLE_FILE).is_file():
        files = [model_dir / _SINGLE_FILE]
    else:
        raise InvalidParameterError(
            "model_dir", str(model_dir), f"no {_SINGLE_FILE} or {_INDEX_FILE} (only safetensors is supported)"
        )

    with ExitStack() as stack:
        checkpoint: dict[str, Any] = {}
        for file in files:
            if not file.is_file():
                raise InvalidParameterError("model_dir", str(model_dir), f"shard {file.name} is missing")
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if name in checkpoint:
                    raise InvalidParameterError("model_dir", str(model_dir), f"{name} is in two shards")
                checkpoint[name] = handle
        yield checkpoint


def _check_names(
    layout: Mapping[str, WeightSource],
    checkpoint: Checkpoint,
    spec: ModelSpec,
    model_dir: Path,
    consumed: set[str] | None = None,
) -> None:
    expected = {name for source in layout.values() for name in source.names}
    missing = sorted(expected - checkpoint.keys())
    if missing:
        raise InvalidParameterError(
            "model_dir",
            str(model_dir),
            f"{len(missing)} weight(s) that {spec.architecture} needs are missing: {_preview(missing)}",
        )
    unexpected = sorted(
        name
        for name in checkpoint.keys() - expected - (consumed or set())
        if not name.endswith(_IGNORED_SUFFIXES)
        # Tied checkpoints may still carry a copy of the embedding as lm_head.
        and not (spec.tie_word_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise InvalidParameterError(
            "model_dir",
            str(model_dir),
            f"{len(unexpected)} weight(s) unknown to {spec.architecture} with this config.json: "
            f"{_preview(unexpected)}",
        )


def _assemble(
    source: WeightSource,
    shape: tuple[int, ...],
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reads (and, for fused parameters, stacks) the source tensors, converted to ``dtype`` on ``device``."""
    parts = []
    for name, rows in zip(source.names, source.rows, strict=True):
        handle = checkpoint[name]
        found = tuple(handle.get_slice(name).get_shape())
        if found != (rows, *shape[1:]):
            raise InvalidParameterError(name, found, f"expected shape {(rows, *shape[1:])}")
        parts.append(handle.get_tensor(name).to(device=device, dtype=dtype))
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown} (+{len(names) - _NAMES_SHOWN} more)"
