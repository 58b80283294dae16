"""Held-out accuracy of a demo checkpoint, with greedy decoding.

The checkpoint is loaded the way any user loads it (``AutoModelForCausalLM`` and
``AutoTokenizer`` from the directory), so a passing evaluation also proves that
the written files are a usable Hugging Face checkpoint. An answer counts only when
the model writes exactly the expected text and then stops with EOS by itself.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from services.demo.corpus import (
    OPERAND_RANGE,
    WORLD,
    TaskExample,
    addition_example,
    addition_pairs,
    all_facts,
    counting_example,
    counting_pairs,
)
from services.demo.tokenizer import load_tokenizer
from services.errors import InvalidParameterError

_EVAL_SEED = "tokenline-demo-eval-v1"  # fixed: every checkpoint is scored on the same examples
_DECODE_BATCH = 64
_MAX_NEW_TOKENS = 16  # the longest answer (three numbers) is 12 tokens plus EOS


@dataclass(frozen=True)
class TaskAccuracy:
    task: str
    held_out: bool  # True: no example of this set was trained on
    correct: int
    total: int
    chance: float  # a uniform guess among the task's possible answers

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class DemoEvaluation:
    """Per-task accuracy; the overall figures cover the held-out tasks only."""

    tasks: tuple[TaskAccuracy, ...]
    held_out_accuracy: float
    held_out_chance: float

    def task(self, name: str) -> TaskAccuracy:
        for task in self.tasks:
            if task.task == name:
                return task
        raise InvalidParameterError("task", name, f"not evaluated; tasks: {[t.task for t in self.tasks]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "held_out_accuracy": self.held_out_accuracy,
            "held_out_chance": self.held_out_chance,
            "tasks": [{**asdict(task), "accuracy": task.accuracy} for task in self.tasks],
        }


@dataclass(frozen=True)
class _EvalSet:
    name: str
    held_out: bool
    as_chat: bool
    examples: tuple[TaskExample, ...]
    chance: float


GreedyGenerator = Callable[[list[list[int]], int], list[list[int]]]
"""``(prompts, max_new_tokens) -> continuations``: greedy, each ending with EOS when the model wrote it."""


def evaluate_demo_model(path: Path, *, num_examples: int = 200) -> DemoEvaluation:
    """Score the checkpoint at ``path`` on up to ``num_examples`` examples per task."""
    if not (Path(path) / "config.json").is_file():
        raise InvalidParameterError("path", str(path), "is not a checkpoint directory (no config.json)")
    tokenizer = load_tokenizer(Path(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    model.train(False)
    eos_token_id = tokenizer.eos_token_id

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_generate(model, prompts, eos_token_id=eos_token_id, max_new_tokens=max_new_tokens)

    return score_demo_tasks(generate, tokenizer, num_examples=num_examples)


def score_demo_tasks(
    generate: GreedyGenerator, tokenizer: PreTrainedTokenizerBase, *, num_examples: int = 200
) -> DemoEvaluation:
    """Score any greedy generator (a quantized replica, another engine) on the demo tasks,
    up to ``num_examples`` examples per task; ``tokenizer`` is the demo checkpoint's."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise InvalidParameterError("num_examples", num_examples, "must be an integer >= 1")
    results = tuple(_score(generate, tokenizer, eval_set) for eval_set in _eval_sets(num_examples))
    held_out = [r for r in results if r.held_out]
    total = sum(r.total for r in held_out)
    return DemoEvaluation(
        tasks=results,
        held_out_accuracy=sum(r.correct for r in held_out) / total,
        held_out_chance=sum(r.chance * r.total for r in held_out) / total,
    )


def _eval_sets(num_examples: int) -> tuple[_EvalSet, ...]:
    rng = random.Random(_EVAL_SEED)

    def sample(pairs: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
        return rng.sample(pairs, min(num_examples, len(pairs)))

    sums = 2 * len(OPERAND_RANGE) - 1
    additions = tuple(addition_example(*pair) for pair in sample(addition_pairs(held_out=True)))
    counting_pool = counting_pairs(held_out=True)
    countings = tuple(counting_example(*pair) for pair in sample(counting_pool))
    chat_additions = tuple(addition_example(*pair) for pair in sample(addition_pairs(held_out=True)))
    facts = all_facts()
    facts = tuple(rng.sample(facts, min(num_examples, len(facts))))
    return (
        _EvalSet("addition", held_out=True, as_chat=False, examples=additions, chance=1 / sums),
        _EvalSet("counting", held_out=True, as_chat=False, examples=countings, chance=1 / len(counting_pool)),
        _EvalSet("chat_addition", held_out=True, as_chat=True, examples=chat_additions, chance=1 / sums),
        # Facts about an invented world can only be recalled, not inferred: not held out.
        _EvalSet("facts", held_out=False, as_chat=False, examples=facts, chance=1 / len(WORLD)),
    )


def _score(generate: GreedyGenerator, tokenizer: PreTrainedTokenizerBase, eval_set: _EvalSet) -> TaskAccuracy:
    prompts = [_prompt_ids(tokenizer, example, eval_set.as_chat) for example in eval_set.examples]
    outputs = generate(prompts, _MAX_NEW_TOKENS)
    correct = 0
    for example, output in zip(eval_set.examples, outputs, strict=True):
        expected = example.answer.strip() if eval_set.as_chat else example.answer
        stopped = bool(output) and output[-1] == tokenizer.eos_token_id
        if stopped and tokenizer.decode(output[:-1]) == expected:
            correct += 1
    return TaskAccuracy(eval_set.name, eval_set.held_out, correct, len(outputs), eval_set.chance)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, example: TaskExample, as_chat: bool) -> list[int]:
    if not as_chat:
        return list(tokenizer(example.prompt).input_ids)
    messages = [{"role": "user", "content": example.prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel, prompts: list[list[int]], *, eos_token_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (EOS included when reached), in the order of ``prompts``.

    Prompts are batched only with prompts of the same length, so no padding is
    needed and every position id is exactly what a single-prompt run would use.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), _DECODE_BATCH):
            chunk = indices[start : start + _DECODE_BATCH]
            generated = _greedy_batch(model, [prompts[i] for i in chunk], eos_token_id, max_new_tokens)
            for index, tokens in zip(chunk, generated, strict=True):
                outputs[index] = tokens
    return outputs


def _greedy_batch(
    model: PreTrainedModel, prompts: list[list[int]], eos_token_id: int, max_new_tokens: int
) -> list[list[int]]:
    result = model(input_ids=torch.tensor(prompts, dtype=torch.long), use_cache=True)
    generated: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_ids = result.logits[:, -1].argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row]:
                generated[row].append(token)
        finished |= next_ids == eos_token_id
        if bool(finished.all()):
            break
        result = model(input_ids=next_ids[:, None], past_key_values=result.past_key_values, use_cache=True)
    return generated
