"""Calibration for the GPTQ recipes: the model's own text, and what its linears see of it.

No machine here reaches a dataset hub, and a model's training corpus rarely ships with it.
So the calibration set is text the source model writes itself: sequences sampled from its
start token at temperature 1 with fixed seeds (reproducible), through our engine. Sampled
text follows the model's own distribution, which is what its activations are calibrated
for; it never contains the gate's held-out text. Each decoder linear's inputs over that
text then give its ``H = X^T X``, collected with forward hooks on the engine's own modules
(the source in float32), one pass per sequence.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.models import load_model
from services.engine.models.llama import checkpoint_layout
from services.errors import InvalidParameterError
from services.messages import SamplingParams
from services.optimizer.config import OptimizerConfig
from services.optimizer.recipes import Recipe
from services.optimizer.scoring import sequence_logits

_HOOKED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_BATCH = 32  # sequences sampled together
_MAX_BATCHES = 64  # a model that ends every text at once stops here, short of the budget
Progress = Callable[[int, int], None]  # (done, total) over the calibration sequences


def calibrate(
    source: Path, recipe: Recipe, config: OptimizerConfig, say: Callable[[float, str], None]
) -> dict[str, torch.Tensor] | None:
    """The inputs' ``X^T X`` of every decoder linear over the model's own text, for a
    calibrated recipe; None for round-to-nearest, which uses no calibration data."""
    if not recipe.calibrated:
        say(1.0, "not needed: round-to-nearest uses no calibration data")
        return None
    budget, length = config.calibration_tokens, config.calibration_max_sequence_tokens
    say(0.0, f"sampling {budget} tokens from the model, up to {length} a sequence")
    sequences = calibration_sequences(source, budget, length, config.calibration_seed, start_token(source))
    tokens = sum(len(ids) for ids in sequences)
    hessians = input_hessians(
        source, sequences, lambda done, total: say(done / total, f"{done}/{total} sequences, {tokens} tokens")
    )
    say(1.0, f"{tokens} tokens of the model's own text")
    return hessians


def start_token(source: Path) -> int | None:
    """The checkpoint's BOS token id, else its (first) EOS id, from config.json."""
    config = json.loads((source / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return None


def calibration_sequences(
    source: Path, tokens: int, max_sequence_tokens: int, seed: int, start: int | None
) -> list[list[int]]:
    """At least ``tokens`` tokens (unless the model keeps ending at once) in sequences of up to
    ``max_sequence_tokens``, sampled by the source model from token ``start`` (its BOS, or EOS
    where it has none); sequence ``i`` with seed ``seed + i``. Sampling goes on in batches
    until the budget is met: a model that writes short texts (the demo model's examples are
    ~13 tokens) needs many more sequences than one that writes long ones."""
    if start is None:
        raise InvalidParameterError("model", str(source), "has neither a BOS nor an EOS token to start from")
    engine = Engine(EngineConfig(model=str(source), kv_cache_memory_gib=0.25, max_num_seqs=_BATCH))
    sequences: list[list[int]] = []
    total = 0
    for _ in range(_MAX_BATCHES):
        first = seed + len(sequences)
        params = [
            SamplingParams(max_tokens=max_sequence_tokens - 1, temperature=1.0, seed=first + i)
            for i in range(_BATCH)
        ]
        for out in engine.generate([[start]] * _BATCH, params):
            sequences.append([start, *out.token_ids])
            total += len(sequences[-1])
        if total >= tokens:
            break
    return sequences


def input_hessians(
    source: Path, sequences: list[list[int]], progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """Hugging Face module name (``model.layers.N.self_attn.q_proj``) -> ``X^T X`` [in, in]
    float64 over every calibration token. The parts of a fused projection (q/k/v, gate/up)
    share one input and so one tensor."""
    model, _ = load_model(source, torch.device("cpu"), torch.float32)
    layout = checkpoint_layout(model.spec)
    sums: dict[str, torch.Tensor] = {}
    hooked = [(name, module) for name, module in model.named_modules() if name.endswith(_HOOKED)]
    if not hooked:
        raise InvalidParameterError("model", str(source), "no decoder linear to calibrate")
    hooks = [module.register_forward_hook(_accumulator(sums, name)) for name, module in hooked]
    try:
        for done, ids in enumerate(sequences, start=1):
            sequence_logits(model, ids)
            if progress is not None:
                progress(done, len(sequences))
    finally:
        for hook in hooks:
            hook.remove()
    hessians: dict[str, torch.Tensor] = {}
    for ours, total in sums.items():
        for checkpoint_name in layout[f"{ours}.weight"].names:
            hessians[checkpoint_name.removesuffix(".weight")] = total
    return hessians


def _accumulator(
    sums: dict[str, torch.Tensor], name: str
) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    def accumulate(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        product = (x.T @ x).double()  # one sequence's sum in float32 (fast), the running total in float64
        previous = sums.get(name)
        sums[name] = product if previous is None else previous + product

    return accumulate
