"""Settings of the offline optimizer actor and the thresholds of its gate (one default each)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class GateThresholds(BaseModel):
    """What a quantized variant must show against its source on held-out data to be published."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_perplexity_ratio: float = Field(gt=1.0, description="Variant perplexity / source perplexity.")
    min_top1_agreement: float = Field(
        gt=0.0, le=1.0, description="Share of held-out positions where both predict the same next token."
    )
    max_demo_accuracy_drop: float = Field(
        ge=0.0, description="Demo model only: held-out task accuracy drop, in percentage points."
    )


DEFAULT_GATES: dict[str, GateThresholds] = {
    "int8": GateThresholds(max_perplexity_ratio=1.01, min_top1_agreement=0.97, max_demo_accuracy_drop=1.0),
    "int8-all": GateThresholds(
        max_perplexity_ratio=1.01, min_top1_agreement=0.97, max_demo_accuracy_drop=1.0
    ),
    "w8a8": GateThresholds(max_perplexity_ratio=1.02, min_top1_agreement=0.95, max_demo_accuracy_drop=1.0),
    "int4": GateThresholds(max_perplexity_ratio=1.05, min_top1_agreement=0.90, max_demo_accuracy_drop=3.0),
}
# GPTQ changes which codes are chosen, not the format: the same bar as round-to-nearest.
DEFAULT_GATES["int8-gptq"] = DEFAULT_GATES["int8"]
DEFAULT_GATES["int4-gptq"] = DEFAULT_GATES["int4"]


class OptimizerConfig(BaseModel):
    """The offline optimizer actor and its gate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    actor_name: str = Field(default="tokenline-optimizer", description="Name of the detached Ray actor.")
    actor_namespace: str = Field(default="tokenline", description="Ray namespace of the actor.")
    num_cpus: float = Field(default=1.0, ge=0.0, description="CPUs the optimizer actor reserves in Ray.")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs the optimizer actor reserves in Ray.")
    variants_dir: str = Field(
        default="", description="Where published variants are written; '' = ~/.cache/tokenline/variants."
    )
    gates: dict[str, GateThresholds] = Field(
        default_factory=lambda: dict(DEFAULT_GATES), description="Gate thresholds per recipe."
    )
    heldout_text: str = Field(
        default="",
        description="Text file for perplexity/KL/top-1 on non-demo models; '' = the packaged project "
        "design document (services/optimizer/data/heldout-design.txt).",
    )
    heldout_max_tokens: int = Field(default=2048, ge=16, description="Held-out tokens scored per model.")
    heldout_window: int = Field(default=256, ge=8, description="Tokens per scored window.")
    demo_examples: int = Field(default=200, ge=1, description="Demo tasks: examples per task in the gate.")
    calibration_tokens: int = Field(
        default=16384, ge=64, description="GPTQ recipes: tokens of the model's own text to calibrate on."
    )
    calibration_max_sequence_tokens: int = Field(
        default=256, ge=8, description="GPTQ recipes: tokens per sampled sequence, at most."
    )
    calibration_seed: int = Field(default=0, description="GPTQ recipes: seed of sequence i is this + i.")
    num_threads: int = Field(default=1, ge=1, description="torch intra-op threads of the actor.")

    def variants_path(self) -> Path:
        if self.variants_dir:
            return Path(self.variants_dir)
        cache_home = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
        return base / "tokenline" / "variants"
