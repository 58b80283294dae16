"""The gate: a variant is compared with its source on held-out data before it may be published.

Figures: perplexity ratio (variant / source), mean KL divergence of the next-token
distributions (source || variant), top-1 agreement, and — for the demo model —
the held-out task accuracy of both (``services.demo.evaluate``) run through our
engine. The variant is also served once through the engine: a variant that does
not load or does not generate fails whatever its other figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.models import load_model
from services.messages import SamplingParams
from services.optimizer.config import GateThresholds
from services.optimizer.scoring import sequence_logits

_SERVE_CHECK_TOKENS = 8


@dataclass(frozen=True)
class Check:
    figure: str
    value: float
    limit: str  # e.g. "<= 1.01"
    passed: bool


@dataclass(frozen=True)
class GateReport:
    recipe: str
    figures: dict[str, float]
    checks: tuple[Check, ...]
    error: str = ""  # why the variant could not be served, when it could not
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.error and all(check.passed for check in self.checks)

    @property
    def failed_figures(self) -> list[str]:
        return [check.figure for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def table(self) -> str:
        rows = [("figure", "value", "limit", "result")]
        rows += [(c.figure, f"{c.value:.4f}", c.limit, "pass" if c.passed else "FAIL") for c in self.checks]
        shown = {c.figure for c in self.checks}
        rows += [(name, f"{value:.4f}", "", "") for name, value in self.figures.items() if name not in shown]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
        ]
        verdict = "PASSED" if self.passed else f"FAILED ({', '.join(self.failed_figures) or self.error})"
        return "\n".join([*lines, f"gate {self.recipe}: {verdict}"])


@dataclass(frozen=True)
class Comparison:
    perplexity_source: float
    perplexity_variant: float
    mean_kl: float
    top1_agreement: float
    tokens: int


def compare_logits(source_dir: Path, variant_dir: Path, sequences: list[list[int]]) -> Comparison:
    """Both models through the engine's model code, float32 activations, same sequences."""
    cpu = torch.device("cpu")
    source, _ = load_model(source_dir, cpu, torch.float32)
    source_logits = [sequence_logits(source, ids)[:-1] for ids in sequences]
    del source
    variant, _ = load_model(variant_dir, cpu, torch.float32)
    nll_source = nll_variant = kl = agree = 0.0
    tokens = 0
    for ids, reference in zip(sequences, source_logits, strict=True):
        logits = sequence_logits(variant, ids)[:-1]
        targets = torch.tensor(ids[1:], dtype=torch.long)
        ref_logp, var_logp = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
        nll_source += float(F.nll_loss(ref_logp, targets, reduction="sum"))
        nll_variant += float(F.nll_loss(var_logp, targets, reduction="sum"))
        kl += float((ref_logp.exp() * (ref_logp - var_logp)).sum())
        agree += float((reference.argmax(-1) == logits.argmax(-1)).sum())
        tokens += len(ids) - 1
    return Comparison(
        perplexity_source=math.exp(nll_source / tokens),
        perplexity_variant=math.exp(nll_variant / tokens),
        mean_kl=kl / tokens,
        top1_agreement=agree / tokens,
        tokens=tokens,
    )


def engine_greedy(
    model_dir: Path, kv_cache_memory_gib: float = 0.25
) -> Callable[[list[list[int]], int], list[list[int]]]:
    """A greedy generator over our engine, for ``services.demo.score_demo_tasks``."""
    engine = Engine(
        EngineConfig(model=str(model_dir), kv_cache_memory_gib=kv_cache_memory_gib, max_num_seqs=64)
    )

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        return [list(out.token_ids) for out in engine.generate(prompts, params)]

    return generate


def serve_once(variant_dir: Path) -> str:
    """'' when the engine loads the variant and generates; otherwise why not."""
    try:
        generate = engine_greedy(variant_dir, kv_cache_memory_gib=0.02)
        out = generate([[1, 2, 3]], _SERVE_CHECK_TOKENS)
    except Exception as error:  # any failure to load or run is the gate's finding, not a crash
        return f"{type(error).__name__}: {error}"
    return "" if out and out[0] else "generated no token"


def run_gate(
    recipe: str,
    source_dir: Path,
    variant_dir: Path,
    sequences: list[list[int]],
    thresholds: GateThresholds,
    demo_examples: int | None,
) -> GateReport:
    """All figures and the verdict; ``demo_examples`` None for a model that is not the demo model."""
    error = serve_once(variant_dir)
    if error:
        return GateReport(recipe, {}, (), error=error)
    comparison = compare_logits(source_dir, variant_dir, sequences)
    ratio = comparison.perplexity_variant / comparison.perplexity_source
    figures = {
        "perplexity_ratio": ratio,
        "mean_kl": comparison.mean_kl,
        "top1_agreement": comparison.top1_agreement,
        "perplexity_source": comparison.perplexity_source,
        "perplexity_variant": comparison.perplexity_variant,
        "heldout_tokens": float(comparison.tokens),
    }
    checks = [
        Check(
            "perplexity_ratio",
            ratio,
            f"<= {thresholds.max_perplexity_ratio}",
            ratio <= thresholds.max_perplexity_ratio,
        ),
        Check(
            "top1_agreement",
            comparison.top1_agreement,
            f">= {thresholds.min_top1_agreement}",
            comparison.top1_agreement >= thresholds.min_top1_agreement,
        ),
    ]
    if demo_examples is not None:
        from services.demo import score_demo_tasks
        from services.demo.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source_dir)
        source_acc = score_demo_tasks(engine_greedy(source_dir), tokenizer, num_examples=demo_examples)
        variant_acc = score_demo_tasks(engine_greedy(variant_dir), tokenizer, num_examples=demo_examples)
        drop = 100.0 * (source_acc.held_out_accuracy - variant_acc.held_out_accuracy)
        figures["demo_accuracy_source"] = source_acc.held_out_accuracy
        figures["demo_accuracy_variant"] = variant_acc.held_out_accuracy
        checks.append(
            Check(
                "demo_accuracy_drop_points",
                drop,
                f"<= {thresholds.max_demo_accuracy_drop}",
                drop <= thresholds.max_demo_accuracy_drop,
            )
        )
    return GateReport(recipe, figures, tuple(checks))
