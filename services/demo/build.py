"""Build the demo checkpoint once, then serve it from the cache.

A build happens in a temporary sibling directory that is renamed into place only
when complete, so a killed build never leaves a directory that looks like a
checkpoint. ``tokenline_demo.json`` is written last and records a SHA-256 of every
other file: a directory counts as complete only when that record matches its seed,
its recipe and the bytes on disk. A file lock next to the target serialises
concurrent builds of the same directory (several workers starting at once).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from services.demo.corpus import TrainingStream, describe_corpus, tokenizer_training_texts
from services.demo.evaluate import evaluate_demo_model
from services.demo.tokenizer import (
    SpecialTokenIds,
    train_bpe_tokenizer,
    write_tokenizer,
)
from services.demo.train import (
    DEFAULT_RECIPE,
    DemoModelRecipe,
    RowEncoder,
    batches,
    initial_model,
    llama_config,
    train,
)
from services.errors import InvalidParameterError

logger = logging.getLogger(__name__)

FORMAT = "tokenline-demo-model"
FORMAT_VERSION = 1
METADATA_FILE = "tokenline_demo.json"
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
GENERATION_MAX_NEW_TOKENS = 64


def default_demo_model_dir(seed: int = 0) -> Path:
    """``$XDG_CACHE_HOME/tokenline/demo-model-v1-seed{seed}`` (``~/.cache`` when unset)."""
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "tokenline" / f"demo-model-v{FORMAT_VERSION}-seed{seed}"


def build_demo_model(
    out_dir: Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    recipe: DemoModelRecipe = DEFAULT_RECIPE,
) -> Path:
    """Return the directory of a complete demo checkpoint, building it unless one is cached."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameterError("seed", seed, "must be an integer >= 0")
    target = Path(out_dir if out_dir is not None else default_demo_model_dir(seed)).expanduser().absolute()
    say = _Progress(log, target)
    if not force and is_complete_demo_model(target, seed=seed, recipe=recipe):
        say("cached demo model found; not rebuilding")  # no lock needed: works on a read-only cache
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target, say):
        if not force and is_complete_demo_model(target, seed=seed, recipe=recipe):
            say("another process built the demo model meanwhile; not rebuilding")
            return target
        _refuse_foreign_directory(target)
        _remove_leftovers_of_dead_builds(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the checkpoint is meant to be shared
            _build_into(staging, seed, recipe, say)
            _install(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    say("demo model ready")
    return target


def is_complete_demo_model(path: Path, *, seed: int, recipe: DemoModelRecipe) -> bool:
    """True when ``path`` holds a finished build for exactly this seed and recipe, byte for byte."""
    metadata = read_metadata(path)
    if metadata is None:
        return False
    if (metadata.get("format"), metadata.get("version")) != (FORMAT, FORMAT_VERSION):
        return False
    if metadata.get("seed") != seed or metadata.get("recipe") != asdict(recipe):
        return False
    recorded = metadata.get("files")
    if not isinstance(recorded, dict) or set(recorded) != set(CHECKPOINT_FILES):
        return False
    return all(
        (path / name).is_file() and _sha256(path / name) == digest for name, digest in recorded.items()
    )


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The build record of a demo checkpoint, or None when there is none (or it is unreadable)."""
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def _build_into(staging: Path, seed: int, recipe: DemoModelRecipe, say: _Progress) -> None:
    started = time.perf_counter()
    say(f"building demo model (seed {seed}, {recipe.train_steps} steps); this takes a few minutes")
    bpe = train_bpe_tokenizer(tokenizer_training_texts(seed, recipe.tokenizer_rows), recipe.vocab_size)
    write_tokenizer(bpe, staging)
    say(f"tokenizer trained: {bpe.get_vocab_size()} tokens")

    special_ids = SpecialTokenIds.of(bpe)
    model = initial_model(llama_config(recipe, bpe.get_vocab_size(), special_ids), seed)
    encoder = RowEncoder(staging)
    summary = train(
        model, batches(TrainingStream(seed), encoder, recipe.batch_size, special_ids.pad), recipe, say
    )
    model.generation_config = GenerationConfig.from_dict(
        {
            "do_sample": False,
            "max_new_tokens": GENERATION_MAX_NEW_TOKENS,
            "pad_token_id": special_ids.pad,
            "bos_token_id": special_ids.bos,
            "eos_token_id": special_ids.eos,
        }
    )
    model.save_pretrained(str(staging))
    say(f"trained {summary.steps} steps in {summary.seconds:.0f}s, final loss {summary.final_loss:.3f}")

    evaluation = evaluate_demo_model(staging, num_examples=recipe.eval_examples)
    per_task = ", ".join(f"{t.task} {t.accuracy:.1%}" for t in evaluation.tasks)
    overall = f"{evaluation.held_out_accuracy:.1%} (chance {evaluation.held_out_chance:.2%})"
    say(f"held-out accuracy {overall}; per task: {per_task}")

    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seed": seed,
        "recipe": asdict(recipe),
        "corpus": describe_corpus(),
        "training": {"steps": summary.steps, "final_loss": summary.final_loss},
        "evaluation": evaluation.to_dict(),
        "files": {name: _sha256(staging / name) for name in CHECKPOINT_FILES},
    }
    for written in staging.iterdir():
        written.chmod(0o644)  # some writers create private files; the checkpoint is meant to be shared
    # Written last: its presence (with matching digests) is what marks the build complete.
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", "utf-8")
    logger.info("demo model built", extra={"seed": seed, "seconds": time.perf_counter() - started})


def _refuse_foreign_directory(target: Path) -> None:
    """Never replace a directory that holds anything but (part of) a demo checkpoint."""
    if not target.exists():
        return
    if not target.is_dir():
        raise InvalidParameterError("out_dir", str(target), "exists and is not a directory")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in {*CHECKPOINT_FILES, METADATA_FILE})
    if foreign:
        raise InvalidParameterError(
            "out_dir", str(target), f"holds files that are not part of a demo model: {foreign[:5]}"
        )


def _remove_leftovers_of_dead_builds(target: Path) -> None:
    # Called under the build lock: a live build of this target would hold it, so any
    # staging or retired directory still here belongs to a build that was killed.
    for pattern in (f".{target.name}.partial-*", f".{target.name}.retired-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _install(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    # Move the old directory aside first: renaming onto a non-empty directory fails.
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.retired-", dir=target.parent))
    os.rename(target, retired / target.name)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def _exclusive(target: Path, say: _Progress) -> Iterator[None]:
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another process is building this demo model; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Progress:
    """Reports progress to the caller's ``log`` (human lines) and to ``logging`` (structured)."""

    def __init__(self, log: Callable[[str], None] | None, target: Path) -> None:
        self._log = log
        self._target = str(target)
        self._started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
        elapsed = time.perf_counter() - self._started
        logger.info(message, extra={"demo_model_dir": self._target, "elapsed_s": round(elapsed, 1)})
