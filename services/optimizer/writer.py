"""Source checkpoint + recipe -> a variant directory in the compressed-tensors layout.

Every ``*_proj`` linear of the decoder layers is quantized; norms are copied in the
source dtype, and so are the embeddings and ``lm_head`` unless the recipe's scheme
quantizes the vocabulary matrices (``int8-all``: see ``services.engine.models.compressed``
for how a tied ``lm_head`` is written). Tokenizer and generation files are copied as
they are, so the variant is a complete Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.engine.models.compressed import QuantizedWeight, QuantScheme, encode, quantization_config
from services.errors import InvalidParameterError
from services.optimizer.recipes import Recipe

_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
EMBEDDING, LM_HEAD = "model.embed_tokens", "lm_head"  # the vocabulary matrices (modules, no ".weight")
_WEIGHT_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_SKIPPED_FILES = {_WEIGHT_FILE, _INDEX_FILE, "config.json"}

Progress = Callable[[int, int], None]  # (done, total) over the tensors


def source_tensors(source: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors checkpoint (one file or shards), in name order."""
    index = source / _INDEX_FILE
    if index.is_file():
        files = sorted({str(f) for f in json.loads(index.read_text())["weight_map"].values()})
    elif (source / _WEIGHT_FILE).is_file():
        files = [_WEIGHT_FILE]
    else:
        raise InvalidParameterError("model", str(source), f"no {_WEIGHT_FILE} or {_INDEX_FILE}")
    for file in files:
        with safe_open(str(source / file), framework="pt", device="cpu") as handle:
            for name in sorted(handle.keys()):
                yield name, handle.get_tensor(name)


def is_quantized_linear(name: str) -> bool:
    return bool(_LINEAR.match(name))


def is_quantized(name: str, scheme: QuantScheme) -> bool:
    """Whether the checkpoint tensor ``name`` (``X.weight``) is quantized under ``scheme``."""
    vocab = scheme.quantizes_vocab and name in (f"{EMBEDDING}.weight", f"{LM_HEAD}.weight")
    return vocab or is_quantized_linear(name)


def is_tied(config: dict[str, Any]) -> bool:
    return config.get("tie_word_embeddings") is True  # the engine's default too (spec.py)


def quantize_checkpoint(
    source: Path,
    recipe: Recipe,
    progress: Progress | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Quantize in memory: HF module name (no ``.weight``) -> QuantizedWeight, other names -> tensor.
    A calibrated recipe needs ``hessians`` (``services.optimizer.calibration.input_hessians``)
    for every decoder linear."""
    if recipe.calibrated and hessians is None:
        raise InvalidParameterError("recipe", recipe.name, "is calibrated: run the calibration first")
    tensors = list(source_tensors(source))
    if recipe.scheme.quantizes_vocab and is_tied(json.loads((source / "config.json").read_text())):
        # A tied checkpoint may carry a copy of the table as lm_head: the variant ties to the codes.
        tensors = [(name, tensor) for name, tensor in tensors if name != f"{LM_HEAD}.weight"]
    result: dict[str, Any] = {}
    for done, (name, tensor) in enumerate(tensors, start=1):
        module = name.removesuffix(".weight")
        if recipe.quantize_calibrated is not None and hessians is not None and is_quantized_linear(name):
            hessian = hessians.get(module)
            if hessian is None:
                raise InvalidParameterError("hessians", module, "no calibration statistics for this linear")
            result[module] = recipe.quantize_calibrated(tensor, hessian)
        elif is_quantized(name, recipe.scheme):
            result[module] = recipe.quantize(tensor)
        else:
            result[name] = tensor
        if progress is not None:
            progress(done, len(tensors))
    if not any(isinstance(value, QuantizedWeight) for value in result.values()):
        raise InvalidParameterError("model", str(source), "no decoder-layer linear to quantize")
    return result


def write_variant(source: Path, quantized: dict[str, Any], recipe: Recipe, out_dir: Path) -> None:
    """Write the variant into ``out_dir`` (which must exist and be empty)."""
    config = json.loads((source / "config.json").read_text())
    dtype = _source_dtype(quantized)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in quantized.items():
        if isinstance(value, QuantizedWeight):
            tensors.update(encode(name, value, recipe.scheme, dtype))
        else:
            tensors[name] = value.contiguous()
    if recipe.scheme.quantizes_vocab and is_tied(config):
        # transformers ties lm_head.weight to the embedding's codes and reads lm_head's own scale.
        tensors[f"{LM_HEAD}.weight_scale"] = tensors[f"{EMBEDDING}.weight_scale"].clone()
    save_file(tensors, str(out_dir / _WEIGHT_FILE), metadata={"format": "pt"})
    config["quantization_config"] = quantization_config(recipe.scheme)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for item in source.iterdir():
        if _copied(item):
            shutil.copy2(item, out_dir / item.name)


def _source_dtype(quantized: dict[str, Any]) -> torch.dtype:
    """The dtype of the unquantized tensors (embeddings or norms): scales are stored in it too."""
    for value in quantized.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float32


def write_dequantized(variant: Path, out_dir: Path) -> None:
    """The variant's weights expanded back to float32 as a dense checkpoint (for parity checks)."""
    from services.engine.models.compressed import decode, scheme_from_config, tensor_names

    config = json.loads((variant / "config.json").read_text())
    scheme = scheme_from_config(config)
    if scheme is None:
        raise InvalidParameterError("variant", str(variant), "not a quantized checkpoint")
    raw = dict(source_tensors(variant))
    dense: dict[str, torch.Tensor] = {}
    for name in sorted(raw):
        module = name.removesuffix(".weight_packed").removesuffix(".weight_scale").removesuffix(".weight")
        module = module.removesuffix(".weight_shape")
        names = tensor_names(module, scheme)
        if is_quantized(f"{module}.weight", scheme) and name in names:
            if name == names[0]:  # (a tied lm_head's lone weight_scale is dropped: the table is it)
                dense[f"{module}.weight"] = decode(module, {n: raw[n] for n in names}, scheme).dequantize()
        else:
            dense[name] = raw[name].float()
    save_file(dense, str(out_dir / _WEIGHT_FILE), metadata={"format": "pt"})
    del config["quantization_config"]
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in variant.iterdir():
        if _copied(item):
            shutil.copy2(item, out_dir / item.name)


def _copied(item: Path) -> bool:
    """Tokenizer, chat template, generation config: yes. Weights, config (rewritten) and the
    source's own build records (``tokenline_*.json``, whose hashes describe the source): no."""
    return (
        item.is_file()
        and item.name not in _SKIPPED_FILES
        and not item.name.endswith(".safetensors")
        and not item.name.startswith("tokenline_")
    )
