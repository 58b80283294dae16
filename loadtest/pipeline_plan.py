"""What one `tokenline bench pipeline` run does: its plan and the requests both sides get.

Prompts are the demo task's questions, seeded; every request asks for the same number of
output tokens, cut so that the longest prompt plus its output fits the model's context.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.tokenizer.tokenizer import PromptTokenizer

CONCURRENCIES = (1, 16)
LOW, HIGH = CONCURRENCIES
MODEL_NAME = "demo"


@dataclass(frozen=True)
class PipelinePlan:
    """What one run does; ``quick`` changes only the number of requests."""

    requests: Mapping[int, int]  # concurrency -> requests timed at that concurrency
    output_tokens: int  # asked per request; cut to fit the model's context
    warmup_requests: int
    probe_samples: int
    quick: bool
    rest_s: float  # the stack is watched this long at rest, between warm-up and the timed runs
    seed: int = 0


def plan_for(quick: bool) -> PipelinePlan:
    return PipelinePlan(
        requests={LOW: 16, HIGH: 64} if quick else {LOW: 48, HIGH: 256},
        output_tokens=48,
        warmup_requests=HIGH,
        probe_samples=50 if quick else 200,
        quick=quick,
        rest_s=5.0 if quick else 10.0,
    )


def demo_prompts(count: int, seed: int) -> list[str]:
    """The demo task's prompts, seeded: addition, counting and facts in turn (from
    ``services.demo.corpus``), or addition alone (``"a+b="``) where that module is missing."""
    rng = random.Random(seed)
    try:
        from services.demo import corpus
    except ImportError:
        return [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(count)]
    makers: tuple[Callable[[], str], ...] = (
        lambda: corpus.addition_example(rng.randint(0, 99), rng.randint(0, 99)).prompt,
        lambda: corpus.counting_example(rng.randint(0, 99), rng.randint(1, 9)).prompt,
        lambda: corpus.fact_example(rng.choice(corpus.WORLD), rng.choice(corpus.FACT_ATTRIBUTES)).prompt,
    )
    return [makers[index % len(makers)]() for index in range(count)]


def output_budget(wanted: int, max_context_length: int, longest_prompt: int) -> int:
    """Output tokens per request: ``wanted``, cut so that prompt + output fits the context."""
    budget = min(wanted, max_context_length - longest_prompt - 1)
    if budget < 2:
        raise ValueError(
            f"a {longest_prompt}-token prompt leaves {budget} output tokens in a context of "
            f"{max_context_length}; inter-token latency needs at least 2"
        )
    return budget


@dataclass(frozen=True)
class Workload:
    """The same requests for both sides: text for the stack, token ids for the engine."""

    texts: Mapping[int, list[str]]  # concurrency (0: warm-up) -> prompts
    ids: Mapping[int, list[list[int]]]
    output_tokens: int

    def all_texts(self) -> list[str]:
        """Every prompt, warm-up first, then each concurrency's in turn."""
        return [text for group in self.texts.values() for text in group]

    def describe(self, plan: PipelinePlan) -> dict[str, Any]:
        lengths = [len(ids) for group in self.ids.values() for ids in group]
        return {
            "prompts": "the demo task's prompts (addition, counting, facts), seeded",
            "seed": plan.seed,
            "prompt_tokens_mean": sum(lengths) / len(lengths),
            "output_tokens": self.output_tokens,
            "decoding": "greedy, ignore_eos",
            "requests": {str(c): plan.requests[c] for c in CONCURRENCIES},
            "warmup_requests": plan.warmup_requests,
            "load": "closed loop: c clients, each sends its next request when its previous one ends",
        }


def make_workload(plan: PipelinePlan, tokenizer: PromptTokenizer) -> Workload:
    from services.tokenizer.prompt import TextPrompt

    counts = {0: plan.warmup_requests, **{c: plan.requests[c] for c in CONCURRENCIES}}
    texts = demo_prompts(sum(counts.values()), plan.seed)
    ids = [tokenizer.encode(TextPrompt(text)) for text in texts]
    by_c_texts: dict[int, list[str]] = {}
    by_c_ids: dict[int, list[list[int]]] = {}
    offset = 0
    for c, n in counts.items():
        by_c_texts[c], by_c_ids[c] = texts[offset : offset + n], ids[offset : offset + n]
        offset += n
    budget = output_budget(plan.output_tokens, tokenizer.max_context_length, max(map(len, ids)))
    return Workload(by_c_texts, by_c_ids, budget)
