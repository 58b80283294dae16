"""Our Llama-family forward pass against the ``transformers`` reference, through the paged cache.

Each family's logits must match the Hugging Face model (float32, eager
attention, whole sequence at once) when the same tokens arrive as one prefill,
as chunks on top of a cached prefix, and inside a mixed batch of decode
tokens and prefill chunks with shuffled, non-contiguous block tables.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine.attention_batch import AttentionBatch, KVCache, PrefillSpan
from services.engine.models import LlamaFamilyModel, ModelSpec, load_model
from services.engine.models.cpu_gemm import PackedLinear, packing_applies
from services.engine.models.loader import matmul_dtype
from services.errors import InvalidParameterError, UnsupportedModelError
from tests.checkpoints import KINDS, load_reference_model, make_tiny_checkpoint

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_BLOCKS = 96
ATOL = 1e-4


@dataclass(frozen=True)
class Loaded:
    """Our model and the transformers reference, loaded from the same checkpoint."""

    model: LlamaFamilyModel
    spec: ModelSpec
    reference: torch.nn.Module
    dtype: torch.dtype


def load_both(checkpoint: Path, dtype: torch.dtype = torch.float32) -> Loaded:
    model, spec = load_model(checkpoint, CPU, dtype)
    return Loaded(model, spec, load_reference_model(checkpoint), dtype)


@dataclass(eq=False)
class Sequence:
    """A sequence's tokens (all known in advance), its blocks, and how much of it is cached."""

    tokens: list[int]
    blocks: list[int]
    reference_logits: torch.Tensor  # [len(tokens), vocab], from one full forward of the reference
    cached: int = 0


class Harness:
    """Plays the engine's model runner: owns KV caches and blocks, builds each step's AttentionBatch."""

    def __init__(self, loaded: Loaded, seed: int = 0) -> None:
        self.loaded = loaded
        spec = loaded.spec
        shape = (spec.num_kv_heads, NUM_BLOCKS, BLOCK_SIZE, spec.head_dim)  # the engine's head-major layout
        generator = torch.Generator().manual_seed(seed)

        # Large finite garbage: reading an unwritten or masked slot ruins parity instead of passing unseen.
        def garbage() -> torch.Tensor:
            return (100 * torch.randn(shape, generator=generator)).to(loaded.dtype)

        self.kv_caches: list[KVCache] = [(garbage(), garbage()) for _ in range(spec.num_layers)]
        self.rng = random.Random(seed)
        self.free_blocks = list(range(NUM_BLOCKS))
        self.rng.shuffle(self.free_blocks)  # sequences get scattered, non-contiguous blocks

    def new_sequence(self, length: int) -> Sequence:
        tokens = [self.rng.randrange(self.loaded.spec.vocab_size) for _ in range(length)]
        blocks = [self.free_blocks.pop() for _ in range(-(-length // BLOCK_SIZE))]
        with torch.no_grad():
            reference_logits = self.loaded.reference(torch.tensor([tokens])).logits[0]
        return Sequence(tokens, blocks, reference_logits)

    def step(
        self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One engine step (decodes first, then prefill chunks): (our logits, the reference's) per row."""
        scheduled = [(seq, 1) for seq in decodes] + prefills
        positions = [(seq, pos) for seq, count in scheduled for pos in range(seq.cached, seq.cached + count)]
        spans, start = [], len(decodes)
        for seq, count in prefills:
            table = torch.tensor(seq.blocks[: -(-(seq.cached + count) // BLOCK_SIZE)])
            spans.append(PrefillSpan(start, start + count, seq.cached + count, table))
            start += count
        width = max((len(seq.blocks) for seq in decodes), default=1)
        lens = [seq.cached + 1 for seq in decodes]
        batch = AttentionBatch(
            slot_mapping=torch.tensor(
                [seq.blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE for seq, pos in positions]
            ),
            num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor(
                [seq.blocks + [0] * (width - len(seq.blocks)) for seq in decodes], dtype=torch.long
            ).reshape(len(decodes), width),
            decode_context_lens=torch.tensor(lens, dtype=torch.long),
            max_decode_context_len=max(lens, default=0),
            prefills=tuple(spans),
        )
        input_ids = torch.tensor([seq.tokens[pos] for seq, pos in positions])
        hidden = self.loaded.model(
            input_ids, torch.tensor([pos for _, pos in positions]), batch, self.kv_caches
        )
        expected = torch.stack([seq.reference_logits[pos] for seq, pos in positions])
        for seq, count in scheduled:
            seq.cached += count
        return self.loaded.model.compute_logits(hidden), expected


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """These models are tiny: threads buy nothing, and on a shared machine a busy second core stalls
    every small op at OpenMP's barrier."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=KINDS)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return load_both(make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param)))


def test_whole_prompt_prefill_matches_reference(loaded: Loaded) -> None:
    harness = Harness(loaded)
    seq = harness.new_sequence(37)
    torch.testing.assert_close(*harness.step([], [(seq, 37)]), atol=ATOL, rtol=0)


def test_chunked_prefill_over_cached_prefix_matches_reference(loaded: Loaded) -> None:
    harness = Harness(loaded)
    seq = harness.new_sequence(41)
    for chunk in (5, 7, 18, 11):  # chunks start mid-block and cross the sliding window
        torch.testing.assert_close(*harness.step([], [(seq, chunk)]), atol=ATOL, rtol=0)


def test_mixed_decode_and_prefill_batch_matches_reference(loaded: Loaded) -> None:
    harness = Harness(loaded, seed=1)
    decoding = [harness.new_sequence(length) for length in (23, 30, 9)]
    harness.step([], [(seq, len(seq.tokens) - 3) for seq in decoding])
    fresh, resumed = harness.new_sequence(13), harness.new_sequence(26)
    harness.step([], [(resumed, 10)])

    for _ in range(3):  # decodes at different context lengths, then prefill chunks, in one batch
        torch.testing.assert_close(*harness.step(decoding, [(fresh, 4), (resumed, 5)]), atol=ATOL, rtol=0)


def test_decode_only_steps_match_reference(loaded: Loaded) -> None:
    harness = Harness(loaded, seed=2)
    sequences = [harness.new_sequence(length) for length in (20, 6)]
    harness.step([], [(seq, len(seq.tokens) - 4) for seq in sequences])
    for _ in range(4):
        torch.testing.assert_close(*harness.step(sequences, []), atol=ATOL, rtol=0)
    lone = harness.new_sequence(19)  # a single decode takes the unmasked path
    harness.step([], [(lone, 18)])
    torch.testing.assert_close(*harness.step([lone], []), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        pytest.param(
            "llama",
            {
                "attention_bias": True,
                "mlp_bias": True,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            },
            id="llama-biases-linear-rope",
        ),
        pytest.param(
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
            id="qwen2-window-on-upper-layers",
        ),
        pytest.param("qwen3", {"attention_bias": True, "tie_word_embeddings": True}, id="qwen3-bias-tied"),
    ],
)
def test_config_variants_match_reference(kind: str, overrides: dict[str, Any], tmp_path: Path) -> None:
    harness = Harness(load_both(make_tiny_checkpoint(kind, tmp_path, seed=3, **overrides)))
    seq = harness.new_sequence(30)
    torch.testing.assert_close(*harness.step([], [(seq, 27)]), atol=ATOL, rtol=0)
    for _ in range(3):
        torch.testing.assert_close(*harness.step([seq], []), atol=ATOL, rtol=0)


def test_spec_reads_family_flags(tmp_path: Path) -> None:
    specs = {kind: _spec(make_tiny_checkpoint(kind, tmp_path / kind)) for kind in KINDS}
    assert specs["llama"].eos_token_ids == (2, 3)  # generation_config's list, config's 2 not repeated
    assert specs["llama"].bos_token_id == 1
    assert specs["llama"].rope.rope_type == "llama3"
    assert specs["llama"].num_kv_heads == 2 and specs["llama"].num_heads == 4
    assert specs["mistral"].sliding_windows == (16, 16)
    assert specs["qwen2"].tie_word_embeddings and specs["qwen2"].qkv_bias and not specs["qwen2"].o_proj_bias
    assert specs["qwen3"].head_dim == 32 and specs["qwen3"].qk_norm
    assert [spec.architecture for spec in specs.values()] == [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ]


def test_qwen_window_layers_read_without_layer_types(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint(
        "qwen2", tmp_path, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    assert _spec(checkpoint).sliding_windows == (None, 8)
    config = _read_config(checkpoint)
    del config["layer_types"]  # configs written before transformers listed layer types
    _write_config(checkpoint, config)
    assert _spec(checkpoint).sliding_windows == (None, 8)


def test_old_style_rope_keys_read_like_rope_parameters(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint("llama", tmp_path)
    new_style = _spec(checkpoint)
    config = _read_config(checkpoint)
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    config["rope_scaling"] = {**parameters, "type": parameters.pop("rope_type")}  # oldest spelling
    _write_config(checkpoint, config)
    assert _spec(checkpoint) == new_style


def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENLINE_NO_PACKED_GEMM", "1")  # plain weights: the state dicts hold every one
    single = make_tiny_checkpoint("qwen3", tmp_path / "single")
    sharded = make_tiny_checkpoint("qwen3", tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single_state = load_model(single, CPU, torch.float32)[0].state_dict()
    sharded_state = load_model(sharded, CPU, torch.float32)[0].state_dict()
    assert single_state.keys() == sharded_state.keys()
    for name, tensor in single_state.items():
        torch.testing.assert_close(sharded_state[name], tensor, atol=0, rtol=0)


def test_bfloat16_load_holds_weights_in_bfloat16_or_matmul_dtype_logits_float32(
    tmp_path: Path,
) -> None:
    checkpoint = make_tiny_checkpoint("llama", tmp_path)
    harness = Harness(load_both(checkpoint, torch.bfloat16))
    # Projections are held in the dtype this CPU multiplies fast (float32 without AVX-512 BF16/AMX),
    # prepacked for oneDNN where that applies (then they are no longer parameters).
    linear_dtype = matmul_dtype(torch.bfloat16, CPU)
    model = harness.loaded.model
    packed = any(isinstance(module, PackedLinear) for module in model.modules())
    assert packed == packing_applies(CPU, linear_dtype)
    for name, param in model.named_parameters():
        is_projection = name.endswith(("_proj.weight", "lm_head.weight"))
        assert param.dtype == (linear_dtype if is_projection else torch.bfloat16), name
    seq = harness.new_sequence(20)
    logits, expected = harness.step([], [(seq, 20)])
    assert logits.dtype == torch.float32
    # bf16 keeps ~3 significant digits; the reference logits span roughly +-6.
    torch.testing.assert_close(logits, expected, atol=0.25, rtol=0)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint("llama", tmp_path)
    _write_config(checkpoint, {**_read_config(checkpoint), "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(checkpoint, CPU, torch.float32)


def test_unsupported_rope_type_is_named(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint("qwen2", tmp_path)
    config = _read_config(checkpoint)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0}
    _write_config(checkpoint, config)
    with pytest.raises(InvalidParameterError, match="yarn") as error:
        load_model(checkpoint, CPU, torch.float32)
    assert error.value.field == "rope_parameters.rope_type"


@pytest.mark.parametrize(
    ("kind", "name", "replacement", "message"),
    [
        pytest.param("mistral", "model.layers.1.mlp.up_proj.weight", None, "needs", id="missing"),
        pytest.param("llama", "lm_head.weight", None, "needs", id="untied-without-lm-head"),
        # The llama config has attention_bias=false: a bias would be silently dropped.
        pytest.param("llama", "model.layers.0.self_attn.q_proj.bias", torch.zeros(64), "unknown", id="extra"),
        pytest.param("qwen3", "model.layers.0.self_attn.k_norm.weight", torch.ones(16), "shape", id="shape"),
    ],
)
def test_weights_that_do_not_fit_the_config_are_named(
    kind: str, name: str, replacement: torch.Tensor | None, message: str, tmp_path: Path
) -> None:
    checkpoint = make_tiny_checkpoint(kind, tmp_path)
    weights = load_file(checkpoint / "model.safetensors")
    if replacement is None:
        del weights[name]
    else:
        weights[name] = replacement
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidParameterError, match=message) as error:
        load_model(checkpoint, CPU, torch.float32)
    assert name in str(error.value)


def _spec(checkpoint: Path) -> ModelSpec:
    return load_model(checkpoint, CPU, torch.float32)[1]


def _read_config(checkpoint: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((checkpoint / "config.json").read_text())
    return config


def _write_config(checkpoint: Path, config: dict[str, Any]) -> None:
    (checkpoint / "config.json").write_text(json.dumps(config))
