"""One decoder-only forward pass for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3).

The families differ only in flags read into :class:`ModelSpec`. The model
consumes the engine's flat batch (no padding, no batch dimension): ``T``
tokens from many sequences, with attention routed through the paged KV cache.

Parameter names follow the Hugging Face checkpoint names (without the
``model.`` prefix) except for two fused matrices: ``qkv_proj`` (q, k, v rows
stacked) and ``gate_up_proj`` (gate, up rows stacked). :func:`checkpoint_layout`
says which checkpoint tensors form each parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.attention import paged_attention
from services.engine.attention_batch import AttentionBatch, KVCache
from services.engine.models.layers import GatedMLP, Linear, RMSNorm
from services.engine.models.rope import RotaryEmbedding, apply_rotary
from services.engine.models.spec import ModelSpec
from services.errors import InvalidParameterError


class Attention(nn.Module):
    """Self-attention of one layer: fused qkv projection, optional q/k norms, RoPE, paged attention."""

    q_norm: RMSNorm | None
    k_norm: RMSNorm | None

    def __init__(self, spec: ModelSpec, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.sliding_window = sliding_window
        qkv_rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        self.qkv_proj = Linear(spec.hidden_size, qkv_rows, spec.qkv_bias)
        self.o_proj = Linear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_proj_bias)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, heads + 2 * kv_heads, self.head_dim)
        v = qkv[:, heads + kv_heads :]
        if self.q_norm is not None and self.k_norm is not None:
            q = apply_rotary(self.q_norm(qkv[:, :heads]), cos, sin)
            k = apply_rotary(self.k_norm(qkv[:, heads : heads + kv_heads]), cos, sin)
        else:
            # q and k are adjacent in the fused output: rotate them with one set of kernels.
            qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
        attended = paged_attention(q, k, v, kv_cache, batch, self.scale, self.sliding_window)
        out: torch.Tensor = self.o_proj(attended.reshape(num_tokens, heads * self.head_dim))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, spec: ModelSpec, sliding_window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, sliding_window)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        h: torch.Tensor = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv_cache)
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out


class LlamaFamilyModel(nn.Module):
    """Token ids -> final hidden states over a flat batch; logits only for the rows asked.

    Build it through :func:`services.engine.models.load_model`; parameters are
    empty until the loader assigns the checkpoint's tensors.
    """

    lm_head: nn.Module | None  # a Linear, an int8 linear (quantized vocabulary) or None (tied)
    embed_tokens: nn.Module  # nn.Embedding, or Int8Embedding for a quantized vocabulary

    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        self.rotary = rotary
        embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        embed_tokens.weight.requires_grad_(False)
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(DecoderLayer(spec, window) for window in spec.sliding_windows)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size, False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """``input_ids``, ``positions`` [T] int64 -> normalised hidden states [T, hidden_size]."""
        if len(kv_caches) != len(self.layers):
            expected = f"one per layer ({len(self.layers)})"
            raise InvalidParameterError("kv_caches", len(kv_caches), expected)
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, batch, kv_cache)
        normalised: torch.Tensor = self.norm(hidden)
        return normalised

    @torch.inference_mode()
    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden_size] (rows picked by the caller) -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            return F.linear(hidden_rows, self.embed_tokens.get_parameter("weight")).float()
        logits: torch.Tensor = self.lm_head(hidden_rows)
        return logits.float()


@dataclass(frozen=True)
class WeightSource:
    """Checkpoint tensors stacked along dim 0, in order, to form one parameter."""

    names: tuple[str, ...]
    rows: tuple[int, ...]  # expected dim-0 size of each


def checkpoint_layout(spec: ModelSpec) -> dict[str, WeightSource]:
    """Our parameter name -> the Hugging Face checkpoint tensors it is built from."""
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layout = {
        "embed_tokens.weight": _single("model.embed_tokens.weight", spec.vocab_size),
        "norm.weight": _single("model.norm.weight", spec.hidden_size),
    }
    if not spec.tie_word_embeddings:
        layout["lm_head.weight"] = _single("lm_head.weight", spec.vocab_size)
    for layer in range(spec.num_layers):
        ours, theirs = f"layers.{layer}", f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layout[f"{ours}.{norm}.weight"] = _single(f"{theirs}.{norm}.weight", spec.hidden_size)
        attn, mlp = f"{theirs}.self_attn", f"{theirs}.mlp"
        projections = {
            f"{ours}.self_attn.qkv_proj": (
                (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
                (q_rows, kv_rows, kv_rows),
                spec.qkv_bias,
            ),
            f"{ours}.self_attn.o_proj": ((f"{attn}.o_proj",), (spec.hidden_size,), spec.o_proj_bias),
            f"{ours}.mlp.gate_up_proj": (
                (f"{mlp}.gate_proj", f"{mlp}.up_proj"),
                (spec.intermediate_size, spec.intermediate_size),
                spec.mlp_bias,
            ),
            f"{ours}.mlp.down_proj": ((f"{mlp}.down_proj",), (spec.hidden_size,), spec.mlp_bias),
        }
        for name, (sources, rows, has_bias) in projections.items():
            layout[f"{name}.weight"] = WeightSource(tuple(f"{s}.weight" for s in sources), rows)
            if has_bias:
                layout[f"{name}.bias"] = WeightSource(tuple(f"{s}.bias" for s in sources), rows)
        if spec.qk_norm:
            for norm in ("q_norm", "k_norm"):
                layout[f"{ours}.self_attn.{norm}.weight"] = _single(
                    f"{theirs}.self_attn.{norm}.weight", spec.head_dim
                )
    return layout


def _single(name: str, rows: int) -> WeightSource:
    return WeightSource((name,), (rows,))
