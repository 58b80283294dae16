# ruff: noqa: RUF001  (the prose mixes Cyrillic, Greek and Latin look-alikes on purpose)
"""The synthetic corpus the demo model learns from.

Every task has answers that can be checked exactly:

- addition: ``"12+35="`` -> ``"47"``, operands 0..99;
- counting: ``"Count: 14 17 20"`` -> ``" 23 26 29"``, start 0..99, step 1..9;
- facts about an invented world: ``"Capital of Zorvia?"`` -> ``" Quellan"``.

Prose about the same world, in a dozen scripts with emoji (ZWJ sequences, flags,
skin tones), teaches the byte-level BPE merges over multi-byte UTF-8 and lets the
model write such text.

About a tenth of the addition pairs and of the counting (start, step) pairs is held
out: never trained on, only evaluated. The split is a salted hash of the pair, so it
is the same for every seed and every checkpoint, and evaluation needs nothing but
the task definitions in this file.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CORPUS_VERSION = 1
OPERAND_RANGE = range(100)
COUNTING_STARTS = range(100)
COUNTING_STEPS = range(1, 10)
COUNTING_SHOWN_TERMS = 3
COUNTING_ANSWER_TERMS = 3

_SPLIT_SALT = b"tokenline-demo-split-v1"
_HELD_OUT_PER_256 = 26  # about one pair in ten


class Task(str, enum.Enum):
    ADDITION = "addition"
    COUNTING = "counting"
    FACTS = "facts"
    PROSE = "prose"  # free text: scored on every token, never evaluated


@dataclass(frozen=True)
class TaskExample:
    """A prompt and the exact answer that must follow it (the EOS token comes after)."""

    task: Task
    prompt: str
    answer: str


@dataclass(frozen=True)
class TrainingExample:
    example: TaskExample
    as_chat: bool  # wrap prompt and answer in the chat template as a user/assistant turn


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    emblem: str
    greeting: str


WORLD: tuple[Country, ...] = (
    Country("Zorvia", "Quellan", "🦊", "Bonjour"),
    Country("Marnok", "Tesh", "🐙", "¡Hola!"),
    Country("Ubrel", "Kaddo", "🌵", "Grüß dich"),
    Country("Sefira", "Lumo", "🍄", "こんにちは"),
    Country("Drennik", "Vyrn", "🐉", "你好"),
    Country("Pellaq", "Imbri", "🦉", "Привет"),
    Country("Kestova", "Rhun", "🌋", "Γειά σου"),
    Country("Tamsk", "Eloa", "🍋", "مرحبا"),
    Country("Wyndel", "Fosk", "🐝", "नमस्ते"),
    Country("Orrin", "Belu", "🌸", "안녕하세요"),
    Country("Gallith", "Nerra", "⚓", "Olá"),
    Country("Brisk", "Tolv", "❤\ufe0f", "Ciao"),
    Country("Yumara", "Sedd", "👩\u200d🚀", "Merhaba"),
    Country("Cavo", "Ilth", "🏔\ufe0f", "Hej"),
    Country("Nimbo", "Parsa", "🐧", "Xin chào"),
    Country("Quenth", "Avel", "👍🏽", "Szia"),
)
FACT_ATTRIBUTES = ("capital", "emblem", "greeting")

# One sentence per row: short rows keep padded batches cheap.
_PROSE_TEMPLATES = (
    "{greeting}! {country} is a small land. Its capital is {capital} and its emblem is {emblem}.",
    "In {capital}, people greet each other with “{greeting}” and wear {emblem}.",
    "Bonjour ! Je visite {capital}, en {country}. ☀\ufe0f",
    "¡Hola! Mañana viajamos a {capital}, la capital de {country}. 🚂",
    "Guten Morgen aus {capital}! Schöne Grüße aus {country}. 🥨",
    "こんにちは！{capital}は{country}の首都です。🗾",
    "你好！{capital}是{country}的首都。🐼",
    "Привет! Столица страны {country} — {capital}. ❄\ufe0f",
    "Γειά σου! Η πρωτεύουσα της {country} είναι η {capital}. 🏛\ufe0f",
    "مرحبا! عاصمة {country} هي {capital}. 🌙",
    "नमस्ते! {country} की राजधानी {capital} है। 🙏",
    "안녕하세요! {country}의 수도는 {capital}입니다. 🌸",
    "Olá! A capital de {country} é {capital}. ⚽",
    "Xin chào! Thủ đô của {country} là {capital}. 🍜",
    "Merhaba! {country} ülkesinin başkenti {capital}. 🧿",
    "The family 👨\u200d👩\u200d👧\u200d👦 flew from {capital} to Tokyo 🇯🇵 and Paris 🇫🇷.",
)


def addition_example(left: int, right: int) -> TaskExample:
    return TaskExample(Task.ADDITION, f"{left}+{right}=", str(left + right))


def counting_example(start: int, step: int) -> TaskExample:
    terms = [start + step * i for i in range(COUNTING_SHOWN_TERMS + COUNTING_ANSWER_TERMS)]
    shown = " ".join(str(t) for t in terms[:COUNTING_SHOWN_TERMS])
    answer = "".join(f" {t}" for t in terms[COUNTING_SHOWN_TERMS:])
    return TaskExample(Task.COUNTING, f"Count: {shown}", answer)


def fact_example(country: Country, attribute: str) -> TaskExample:
    return TaskExample(
        Task.FACTS, f"{attribute.capitalize()} of {country.name}?", f" {getattr(country, attribute)}"
    )


def addition_pairs(*, held_out: bool) -> tuple[tuple[int, int], ...]:
    pairs = ((a, b) for a in OPERAND_RANGE for b in OPERAND_RANGE)
    return tuple(p for p in pairs if _is_held_out(f"{p[0]}+{p[1]}") == held_out)


def counting_pairs(*, held_out: bool) -> tuple[tuple[int, int], ...]:
    pairs = ((s, d) for s in COUNTING_STARTS for d in COUNTING_STEPS)
    return tuple(p for p in pairs if _is_held_out(f"{p[0]}:{p[1]}") == held_out)


def all_facts() -> tuple[TaskExample, ...]:
    return tuple(fact_example(country, attribute) for country in WORLD for attribute in FACT_ATTRIBUTES)


def all_prose() -> tuple[str, ...]:
    return tuple(
        template.format(country=c.name, capital=c.capital, emblem=c.emblem, greeting=c.greeting)
        for c in WORLD
        for template in _PROSE_TEMPLATES
    )


@dataclass(frozen=True)
class CorpusMix:
    """Shares of each kind of training row; the task shares are relative weights."""

    addition: float = 0.40
    counting: float = 0.25
    facts: float = 0.20
    prose: float = 0.15
    chat_share: float = 0.25  # of task rows (not prose), wrapped in the chat template

    def describe(self) -> dict[str, float]:
        return {
            "addition": self.addition,
            "counting": self.counting,
            "facts": self.facts,
            "prose": self.prose,
            "chat_share": self.chat_share,
        }


class TrainingStream:
    """An endless, seeded stream of training rows drawn only from the training split."""

    def __init__(self, seed: int, mix: CorpusMix | None = None) -> None:
        self._rng = random.Random(seed)
        self._mix = mix or CorpusMix()
        self._addition = addition_pairs(held_out=False)
        self._counting = counting_pairs(held_out=False)
        self._facts = all_facts()
        self._prose = all_prose()

    def __iter__(self) -> Iterator[TrainingExample]:
        return self

    def __next__(self) -> TrainingExample:
        mix = self._mix
        (task,) = self._rng.choices(
            (Task.ADDITION, Task.COUNTING, Task.FACTS, Task.PROSE),
            weights=(mix.addition, mix.counting, mix.facts, mix.prose),
        )
        if task is Task.PROSE:
            return TrainingExample(TaskExample(Task.PROSE, "", self._rng.choice(self._prose)), as_chat=False)
        if task is Task.ADDITION:
            example = addition_example(*self._rng.choice(self._addition))
        elif task is Task.COUNTING:
            example = counting_example(*self._rng.choice(self._counting))
        else:
            example = self._rng.choice(self._facts)
        return TrainingExample(example, as_chat=self._rng.random() < mix.chat_share)

    def take(self, count: int) -> list[TrainingExample]:
        return [next(self) for _ in range(count)]


def tokenizer_training_texts(seed: int, sampled_rows: int) -> list[str]:
    """Text for BPE training: every fact and prose line once, plus sampled task rows."""
    rows = [example.prompt + example.answer for example in all_facts()]
    rows.extend(all_prose())
    rows.extend(row.example.prompt + row.example.answer for row in TrainingStream(seed).take(sampled_rows))
    return rows


def describe_corpus(mix: CorpusMix | None = None) -> dict[str, Any]:
    """What the checkpoint was trained on, for ``tokenline_demo.json``."""
    return {
        "version": CORPUS_VERSION,
        "tasks": {
            Task.ADDITION.value: {
                "format": "12+35= -> 47",
                "operands": [0, 99],
                "held_out_pairs": len(addition_pairs(held_out=True)),
            },
            Task.COUNTING.value: {
                "format": "Count: 14 17 20 -> ' 23 26 29'",
                "starts": [0, 99],
                "steps": [1, 9],
                "held_out_pairs": len(counting_pairs(held_out=True)),
            },
            Task.FACTS.value: {"format": "Capital of Zorvia? -> ' Quellan'", "countries": len(WORLD)},
            Task.PROSE.value: {"sentences": len(all_prose()), "templates": len(_PROSE_TEMPLATES)},
        },
        "held_out": "addition pairs and counting (start, step) pairs whose salted hash falls in ~1/10",
        "mix": (mix or CorpusMix()).describe(),
    }


def _is_held_out(key: str) -> bool:
    return hashlib.sha256(_SPLIT_SALT + key.encode()).digest()[0] < _HELD_OUT_PER_256
