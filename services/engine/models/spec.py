"""What the engine needs to know about a checkpoint, read from its ``config.json``.

The four supported architectures share one forward pass; they differ only in
the flags collected here (projection biases, q/k norms, sliding windows,
RoPE scaling). Everything is validated once, at load time, so that the
forward code never meets a configuration it cannot run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.engine.models.rope import RopeSpec, rope_spec_from_config
from services.errors import InvalidParameterError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_QWEN_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
_QWEN_MAX_WINDOW_LAYERS = 28  # transformers' default when a Qwen config omits max_window_layers


@dataclass(frozen=True)
class ModelSpec:
    """Shapes, special tokens and per-family flags of one checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeSpec
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on the q, k and v projections
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    # Per layer: a query sees only the last `window` positions (itself included),
    # or None for full causal attention. Windows that cover the whole context are None.
    sliding_windows: tuple[int | None, ...]


def spec_from_config(config: Mapping[str, Any], generation_config: Mapping[str, Any]) -> ModelSpec:
    """Validates a Hugging Face ``config.json`` (and ``generation_config.json``, possibly empty)."""
    architecture = _architecture(config)
    hidden_size = _positive_int(config, "hidden_size")
    num_heads = _positive_int(config, "num_attention_heads")
    num_kv_heads = _positive_int(config, "num_key_value_heads", default=num_heads)
    if num_heads % num_kv_heads:
        raise InvalidParameterError(
            "num_key_value_heads", num_kv_heads, f"must divide num_attention_heads={num_heads}"
        )
    if config.get("head_dim") is None and hidden_size % num_heads:
        raise InvalidParameterError("hidden_size", hidden_size, f"not divisible by {num_heads} heads")
    head_dim = _positive_int(config, "head_dim", default=hidden_size // num_heads)
    if head_dim % 2:
        raise InvalidParameterError("head_dim", head_dim, "RoPE needs an even head dimension")
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise InvalidParameterError("hidden_act", hidden_act, "only 'silu' is supported")

    num_layers = _positive_int(config, "num_hidden_layers")
    max_positions = _positive_int(config, "max_position_embeddings")
    attention_bias = _flag(config, "attention_bias")
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    bias_free = architecture == "MistralForCausalLM"
    return ModelSpec(
        architecture=architecture,
        vocab_size=_positive_int(config, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_positive_int(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=_positive_float(config, "rms_norm_eps", default=1e-6),
        rope=rope_spec_from_config(config),
        eos_token_ids=_eos_token_ids(config, generation_config),
        bos_token_id=_bos_token_id(config, generation_config),
        tie_word_embeddings=_flag(config, "tie_word_embeddings"),
        # Qwen2 hard-codes q/k/v biases; Mistral has none; the others follow `attention_bias`.
        qkv_bias=is_qwen2 or (attention_bias and not bias_free),
        o_proj_bias=attention_bias and not (is_qwen2 or bias_free),
        mlp_bias=architecture == "LlamaForCausalLM" and _flag(config, "mlp_bias"),
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_windows=_sliding_windows(config, architecture, num_layers, max_positions),
    )


def _architecture(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise InvalidParameterError("architectures", architectures, "config.json must name one architecture")
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(str(architecture), SUPPORTED_ARCHITECTURES)
    return str(architecture)


def _sliding_windows(
    config: Mapping[str, Any], architecture: str, num_layers: int, max_positions: int
) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    # Qwen configs carry a sliding_window value that is inert unless use_sliding_window is set.
    if architecture in _QWEN_ARCHITECTURES and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise InvalidParameterError("sliding_window", window, "must be a positive integer or null")
    effective = window if window < max_positions else None

    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise InvalidParameterError("layer_types", layer_types, f"must list {num_layers} layer types")
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise InvalidParameterError("layer_types", sorted(unknown), "unsupported attention types")
        return tuple(effective if kind == "sliding_attention" else None for kind in layer_types)
    if architecture in _QWEN_ARCHITECTURES:
        first_sliding = _positive_int(config, "max_window_layers", default=_QWEN_MAX_WINDOW_LAYERS)
        return tuple(effective if layer >= first_sliding else None for layer in range(num_layers))
    return (effective,) * num_layers


def _eos_token_ids(config: Mapping[str, Any], generation_config: Mapping[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source, name in ((generation_config, "generation_config.eos_token_id"), (config, "eos_token_id")):
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if token is None:
                continue
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidParameterError(name, value, "must be a token id or a list of token ids")
            if token not in ids:
                ids.append(token)
    return tuple(ids)


def _bos_token_id(config: Mapping[str, Any], generation_config: Mapping[str, Any]) -> int | None:
    value = generation_config.get("bos_token_id", config.get("bos_token_id"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameterError("bos_token_id", value, "must be a token id or null")
    return value


def _positive_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidParameterError(key, value, "must be a positive integer")
    return value


def _positive_float(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParameterError(key, value, "must be a positive number")
    return float(value)


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise InvalidParameterError(key, value, "must be true or false")
    return value
