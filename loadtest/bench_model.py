"""Random-init Llama-shaped checkpoints for benchmarks.

No model hub is reachable, and a benchmark only needs realistic *shapes*, so we
build the checkpoint ourselves: transformers' ``LlamaConfig`` + ``save_pretrained``
into a directory, seeded, in the standard Hugging Face layout both our engine and
``transformers`` load. The generation config carries no EOS id so neither side
can stop early: every request runs for exactly the tokens it asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class ModelShape:
    """The knobs that decide a Llama model's size (untied embeddings, GQA)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048

    def to_config(self) -> LlamaConfig:
        fields = asdict(self)
        fields.pop("name")
        return LlamaConfig(
            **fields,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        )


# ~40M parameters: the throughput workload's model (large enough that the matmuls,
# not Python, should dominate a well-batched step on CPU).
THROUGHPUT_MODEL = ModelShape(
    name="llama-40m",
    vocab_size=16000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
)

# ~153M parameters: the batch-1 decode model, measured against the memory roofline.
DECODE_MODEL = ModelShape(
    name="llama-150m",
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
)

# A few hundred thousand parameters: for the smoke test of the benchmark's code paths.
TINY_MODEL = ModelShape(
    name="llama-tiny",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class BenchModel:
    """A checkpoint on disk plus the facts the report needs about it."""

    shape: ModelShape
    path: Path
    num_params: int
    # Bytes one decode step must stream from memory: every weight matrix except the
    # input embedding table, of which a step reads only one row per token.
    decode_weight_bytes: int
    total_weight_bytes: int


def build_checkpoint(shape: ModelShape, directory: Path, seed: int) -> BenchModel:
    """Write a seeded random-init float32 checkpoint of ``shape`` into ``directory``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.to_config())  # float32: torch's default dtype
    # Random init gives the logits a narrow spread; that is fine for timing, and greedy
    # agreement between implementations is only reported, never required.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=None, eos_token_id=None, pad_token_id=0, do_sample=False
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    num_params = sum(p.numel() for p in model.parameters())
    element = torch.empty((), dtype=torch.float32).element_size()
    embedding_params = model.model.embed_tokens.weight.numel()
    return BenchModel(
        shape=shape,
        path=directory,
        num_params=num_params,
        decode_weight_bytes=(num_params - embedding_params) * element,
        total_weight_bytes=num_params * element,
    )
