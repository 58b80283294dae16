"""The training loop of the demo model: a small Llama trained with plain AdamW.

Training stops after a fixed number of steps, never by wall clock, so that a seed
fixes every weight. Rows are packed several to a sequence, each attending only to
itself; only the answer (and its EOS) is scored for task rows, every token for prose.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from services.demo.corpus import TrainingExample, TrainingStream
from services.demo.tokenizer import SpecialTokenIds, load_tokenizer
from services.errors import InvalidParameterError

logger = logging.getLogger(__name__)

IGNORED_LABEL = -100  # the label value Hugging Face's causal-LM loss skips
MAX_POSITION_EMBEDDINGS = 2048
PACK_WIDTH = 64  # tokens per packed training sequence; longer rows get a pack of their own width


@dataclass(frozen=True)
class DemoModelRecipe:
    """Everything that shapes the demo model besides the seed. The default is the real recipe;
    tests use tiny ones.

    Sized by measurement on two quiet CPU cores: a step takes about 0.12 s, so the
    whole build takes a little over two minutes. At this budget, more steps of a
    narrow model beat fewer steps of a wide one (hidden 256 for 440 steps reached
    76% held-out accuracy, hidden 128 for 1000 steps 91-94%), and batches below 128
    rows made the gradient too noisy for addition to generalise.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 1024  # upper bound; BPE training may stop short of it
    train_steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1.5e-3
    tokenizer_rows: int = 4000  # sampled task rows the BPE is trained on, besides all prose and facts
    eval_examples: int = 200  # per task, for the accuracy recorded at build time

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidParameterError(f"recipe.{field.name}", value, "must be a positive number")
            if field.type == "int" and not isinstance(value, int):
                raise InvalidParameterError(f"recipe.{field.name}", value, "must be an integer")
        if self.hidden_size % self.num_heads:
            raise InvalidParameterError("recipe.num_heads", self.num_heads, "must divide hidden_size")
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError("recipe.num_kv_heads", self.num_kv_heads, "must divide num_heads")
        if not math.isfinite(self.learning_rate):
            raise InvalidParameterError("recipe.learning_rate", self.learning_rate, "must be finite")


DEFAULT_RECIPE = DemoModelRecipe()


def llama_config(recipe: DemoModelRecipe, vocab_size: int, special_ids: SpecialTokenIds) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=special_ids.pad,
        bos_token_id=special_ids.bos,
        eos_token_id=special_ids.eos,
    )


def initial_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the caller's global torch RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Training passes boolean block-diagonal masks, which mean "may attend" to SDPA.
    model.set_attn_implementation("sdpa")
    return model


@dataclass(frozen=True)
class EncodedRow:
    input_ids: tuple[int, ...]
    scored_from: int  # labels before this position are ignored


class RowEncoder:
    """Turns training rows into token ids exactly as a served prompt is tokenized (the
    checkpoint's own ``tokenizer.json`` and chat template), so the model trains on the
    ids it will see."""

    def __init__(self, checkpoint_dir: Path) -> None:
        # Ids come from the raw tokenizer (same file, same pipeline as AutoTokenizer, a
        # fraction of its per-call cost); the transformers tokenizer renders chats.
        self._ids = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        self._chat = load_tokenizer(checkpoint_dir)
        self._eos_id = SpecialTokenIds.of(self._ids).eos
        self._cache: dict[TrainingExample, EncodedRow] = {}

    def encode(self, row: TrainingExample) -> EncodedRow:
        encoded = self._cache.get(row)
        if encoded is None:
            encoded = self._encode_chat(row) if row.as_chat else self._encode_plain(row)
            self._cache[row] = encoded
        return encoded

    def _encode_plain(self, row: TrainingExample) -> EncodedRow:
        prompt_ids = self._ids.encode(row.example.prompt).ids
        full_ids = [*self._ids.encode(row.example.prompt + row.example.answer).ids, self._eos_id]
        return self._split(row, prompt_ids, full_ids)

    def _encode_chat(self, row: TrainingExample) -> EncodedRow:
        user = {"role": "user", "content": row.example.prompt}
        assistant = {"role": "assistant", "content": row.example.answer.strip()}
        prompt = self._chat.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        full = self._chat.apply_chat_template([user, assistant], tokenize=False)
        if not isinstance(prompt, str) or not isinstance(full, str):
            raise InvalidParameterError("chat_template", type(full).__name__, "must render to text")
        prompt_ids = self._ids.encode(prompt, add_special_tokens=False).ids
        full_ids = self._ids.encode(full, add_special_tokens=False).ids
        return self._split(row, prompt_ids, full_ids)

    def _split(self, row: TrainingExample, prompt_ids: list[int], full_ids: list[int]) -> EncodedRow:
        # The prompt must tokenize the same alone as in front of its answer, or the
        # model would learn to continue ids that a real prompt never produces.
        if full_ids[: len(prompt_ids)] != prompt_ids or full_ids[-1] != self._eos_id:
            raise InvalidParameterError(
                "corpus.row", row.example.prompt, "prompt ids are not a prefix of the row"
            )
        return EncodedRow(tuple(full_ids), len(prompt_ids))


@dataclass(frozen=True)
class Batch:
    """Rows packed into ``[packs, width]`` sequences, each row attending only to itself."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor  # every row starts at position 0, as a prompt does when served
    attention_mask: torch.Tensor  # [packs, 1, width, width] bool: True where a query may attend a key
    labels: torch.Tensor


def pack(rows: list[EncodedRow], pad_id: int, width: int = PACK_WIDTH) -> Batch:
    """Pack rows first-fit-decreasing into sequences of ``width`` tokens.

    Rows differ in length by 3x; padding each to the longest would double the
    compute of a step. The block-diagonal causal mask and per-row positions make a
    packed row's logits the same as if it ran alone.
    """
    width = max(width, *(len(row.input_ids) for row in rows))
    packs: list[list[EncodedRow]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: len(r.input_ids), reverse=True):
        fits = next((i for i, free in enumerate(room) if len(row.input_ids) <= free), None)
        if fits is None:
            packs.append([])
            room.append(width)
            fits = len(packs) - 1
        packs[fits].append(row)
        room[fits] -= len(row.input_ids)

    # Built as lists and converted once: thousands of tiny tensor writes cost more than the step.
    input_ids = [[pad_id] * width for _ in packs]
    position_ids = [[0] * width for _ in packs]
    labels = [[IGNORED_LABEL] * width for _ in packs]
    segments = [[-1] * width for _ in packs]  # padding is a segment of its own
    for p, packed in enumerate(packs):
        offset = 0
        for segment, row in enumerate(packed):
            length = len(row.input_ids)
            input_ids[p][offset : offset + length] = row.input_ids
            position_ids[p][offset : offset + length] = range(length)
            labels[p][offset + row.scored_from : offset + length] = row.input_ids[row.scored_from :]
            segments[p][offset : offset + length] = [segment] * length
            offset += length
    segment_ids = torch.tensor(segments)
    positions = torch.arange(width)
    causal = positions[None, :] <= positions[:, None]
    attention_mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    return Batch(
        torch.tensor(input_ids), torch.tensor(position_ids), attention_mask[:, None], torch.tensor(labels)
    )


def batches(stream: TrainingStream, encoder: RowEncoder, batch_size: int, pad_id: int) -> Iterator[Batch]:
    while True:
        yield pack([encoder.encode(row) for row in stream.take(batch_size)], pad_id)


@dataclass(frozen=True)
class TrainingSummary:
    steps: int
    final_loss: float  # mean over the last tenth of the steps
    seconds: float


def train(
    model: LlamaForCausalLM,
    data: Iterator[Batch],
    recipe: DemoModelRecipe,
    log: Callable[[str], None],
) -> TrainingSummary:
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, weight_decay=0.01), lr=recipe.learning_rate, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(recipe.train_steps))
    model.train()
    started = time.perf_counter()
    recent_losses: deque[float] = deque(maxlen=max(1, recipe.train_steps // 10))
    report_every = max(1, recipe.train_steps // 10)
    for step in range(1, recipe.train_steps + 1):
        batch = next(data)
        loss = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        recent_losses.append(loss.item())
        if step % report_every == 0 or step == recipe.train_steps:
            elapsed = time.perf_counter() - started
            log(f"step {step}/{recipe.train_steps}: loss {loss.item():.3f} ({elapsed:.0f}s)")
            logger.info("demo training step", extra={"step": step, "loss": loss.item(), "seconds": elapsed})
    model.train(False)
    return TrainingSummary(
        recipe.train_steps, sum(recent_losses) / len(recent_losses), time.perf_counter() - started
    )


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # Decay matrices only: decaying norm gains pulls them towards zero for no benefit.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _warmup_cosine(total_steps: int) -> Callable[[int], float]:
    warmup = max(1, total_steps // 20)
    floor = 0.1

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
