"""The demo model: a small Llama checkpoint that tokenline builds for itself.

No model hub is reachable from the machines this project runs on, so
``build_demo_model`` trains a byte-level BPE tokenizer and a small Llama on a
synthetic, checkable corpus (see ``corpus``) and writes a standard Hugging Face
checkpoint directory, cached after the first build. ``evaluate_demo_model``
measures its held-out accuracy.
"""

from services.demo.build import (
    build_demo_model,
    default_demo_model_dir,
    is_complete_demo_model,
    read_metadata,
)
from services.demo.evaluate import (
    DemoEvaluation,
    GreedyGenerator,
    TaskAccuracy,
    evaluate_demo_model,
    greedy_generate,
    score_demo_tasks,
)
from services.demo.train import DEFAULT_RECIPE, DemoModelRecipe

__all__ = [
    "DEFAULT_RECIPE",
    "DemoEvaluation",
    "DemoModelRecipe",
    "GreedyGenerator",
    "TaskAccuracy",
    "build_demo_model",
    "default_demo_model_dir",
    "evaluate_demo_model",
    "greedy_generate",
    "is_complete_demo_model",
    "read_metadata",
    "score_demo_tasks",
]
