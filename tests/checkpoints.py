"""Tiny random-initialised Hugging Face checkpoints of every supported family.

Each family is configured so that its distinguishing features are exercised:

- ``llama``: grouped-query attention and Llama 3 RoPE scaling, untied head;
- ``mistral``: a sliding window (16) shorter than the test sequences;
- ``qwen2``: q/k/v biases and tied embeddings;
- ``qwen3``: q/k RMSNorms and an explicit ``head_dim`` (32) unequal to hidden / heads.

Weights are redrawn larger than ``transformers``' default initialisation (std
0.02), which would leave activations so small that nearly any forward pass
agrees with the reference to 1e-4; norm weights and biases are randomised too,
so that swapping or dropping one changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

KINDS = ("llama", "mistral", "qwen2", "qwen3")
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

_COMMON: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}
# Old-style `rope_theta` / `rope_scaling` keys: every supported transformers version accepts them.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 3,
        "rope_theta": 10_000.0,
        # original_max_position_embeddings=64 puts the 16-dim head's wavelengths in all
        # three Llama 3 bands (kept, blended, slowed).
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": False,
    },
    "mistral": {
        "model_type": "mistral",
        "num_hidden_layers": 2,
        "sliding_window": 16,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "model_type": "qwen3",
        "num_hidden_layers": 2,
        "head_dim": 32,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
    },
}
# Llama 3 checkpoints list several end tokens in generation_config.json.
_GENERATION_EOS: dict[str, int | list[int]] = {"llama": [EOS_TOKEN_ID, 3]}

_WEIGHT_STD = 0.2
_NORM_AND_BIAS_STD = 0.2


def make_tiny_checkpoint(
    kind: str, out_dir: Path, seed: int = 0, *, max_shard_size: str | None = None, **overrides: Any
) -> Path:
    """Writes a float32 checkpoint of family ``kind`` into ``out_dir`` and returns ``out_dir``.

    ``overrides`` replace config fields (``attention_bias=True``, ``rope_scaling={...}``).
    ``max_shard_size`` (e.g. ``"20KB"``) writes sharded safetensors with an index.
    """
    if kind not in _FAMILIES:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    settings = {**_COMMON, **_FAMILIES[kind], **overrides}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    _randomise(model, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_options)  # safetensors is the default format
    eos = _GENERATION_EOS.get(kind, EOS_TOKEN_ID)
    generation = GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=eos)  # type: ignore[no-untyped-call]
    generation.save_pretrained(out_dir)
    return out_dir


def load_reference_model(checkpoint_dir: Path) -> PreTrainedModel:
    """The ``transformers`` model of a checkpoint, float32 with eager attention, for parity checks."""
    # from_pretrained returns the model in eval mode.
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model


def _randomise(model: PreTrainedModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + _NORM_AND_BIAS_STD * noise)
            elif param.ndim == 1:
                param.copy_(_NORM_AND_BIAS_STD * noise)
            else:
                param.copy_(_WEIGHT_STD * noise)
