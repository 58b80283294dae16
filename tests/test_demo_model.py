"""The demo model: deterministic builds, a standard Hugging Face checkpoint, a cache
that never mistakes a partial build for a finished one, and real held-out skill.

Most tests build a tiny recipe (seconds); one session fixture builds the real
default recipe once per machine (then cached) and checks its held-out accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from services.demo import (
    DemoModelRecipe,
    build_demo_model,
    default_demo_model_dir,
    evaluate_demo_model,
    is_complete_demo_model,
    read_metadata,
)
from services.demo.corpus import Task, TrainingStream, addition_pairs, counting_pairs
from services.demo.tokenizer import SpecialTokenIds
from services.demo.train import RowEncoder, initial_model, llama_config, pack
from services.errors import InvalidParameterError

TINY = DemoModelRecipe(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    vocab_size=400,
    train_steps=6,
    batch_size=8,
    tokenizer_rows=100,
    eval_examples=2,
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, recipe=TINY)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real recipe in the default cache directory: built once per machine, then cached."""
    return build_demo_model()


def _build_script(target: Path, recipe: DemoModelRecipe, seed: int = 0) -> str:
    """Python source that builds ``recipe`` into ``target`` in a fresh interpreter, logging to stdout."""
    return textwrap.dedent(
        f"""
        from pathlib import Path
        from services.demo import DemoModelRecipe, build_demo_model
        build_demo_model(Path({str(target)!r}), seed={seed}, recipe=DemoModelRecipe(**{asdict(recipe)!r}),
                         log=lambda line: print(line, flush=True))
        """
    )


def test_same_seed_builds_identical_bytes_and_another_seed_does_not(tiny_model: Path, tmp_path: Path) -> None:
    # Another process, so that per-process state (hash seeds, thread pools) cannot hide in the result.
    again = tmp_path / "again"
    subprocess.run(
        [sys.executable, "-c", _build_script(again, TINY)], cwd=REPO_ROOT, check=True, capture_output=True
    )
    other = build_demo_model(tmp_path / "other", seed=1, recipe=TINY)
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights


def test_checkpoint_loads_with_transformers_as_is(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer("12+35=").input_ids[0] == tokenizer.bos_token_id == config["bos_token_id"]
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["do_sample"] is False
    metadata = read_metadata(tiny_model)
    assert metadata is not None and metadata["seed"] == 0
    assert 0.0 <= metadata["evaluation"]["held_out_accuracy"] <= 1.0


def test_chat_template_renders_turns_and_the_generation_prompt(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+35="}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|system|>\nBe brief.\n<|user|>\n12+35=\n<|assistant|>\n"
    answered = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "47"}], tokenize=False
    )
    assert isinstance(answered, str) and answered.endswith("<|assistant|>\n47</s>")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids  # role markers are single tokens
    with pytest.raises(TemplateError, match="role must be"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_tokenizer_merges_multibyte_utf8_and_keeps_digits_single(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    text = "こんにちは 👩\u200d🚀 Привет 12+35=47"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    pieces = [str(tokenizer.decode([i])) for i in ids]
    assert any(len(piece.strip()) >= 2 and not piece.isascii() for piece in pieces), pieces
    assert any("\ufffd" in piece for piece in pieces), "expected a token that splits a character"
    assert [p for p in pieces if p.isdigit()] == list("123547")


def test_cached_build_returns_without_rebuilding(tiny_model: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()}
    lines: list[str] = []
    started = time.perf_counter()
    assert build_demo_model(tiny_model, seed=0, recipe=TINY, log=lines.append) == tiny_model
    assert time.perf_counter() - started < 2.0
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()} == before
    assert any("cached" in line for line in lines)


def test_partial_or_corrupt_directory_is_not_taken_as_complete(tiny_model: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    (partial / "tokenline_demo.json").unlink()
    assert not is_complete_demo_model(partial, seed=0, recipe=TINY)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    assert not is_complete_demo_model(corrupt, seed=0, recipe=TINY)
    assert not is_complete_demo_model(tiny_model, seed=1, recipe=TINY)

    for broken in (partial, corrupt):
        assert build_demo_model(broken, seed=0, recipe=TINY) == broken
        assert is_complete_demo_model(broken, seed=0, recipe=TINY)
        assert (broken / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_killed_build_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    target = tmp_path / "model"
    slow = replace(TINY, train_steps=100_000)
    build = subprocess.Popen(
        [sys.executable, "-c", _build_script(target, slow)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert build.stdout is not None
        for line in build.stdout:
            if line.startswith("tokenizer trained"):
                break  # training starts: tokenizer files are written, weights are not
        else:
            pytest.fail(f"the build ended before training started (exit {build.wait()})")
        os.kill(build.pid, signal.SIGKILL)
    finally:
        build.kill()
        build.wait()
    assert not target.exists()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".model.partial-")]
    assert (leftover / "tokenizer.json").exists()
    assert not is_complete_demo_model(leftover, seed=0, recipe=slow)
    assert build_demo_model(target, seed=0, recipe=TINY) == target
    assert is_complete_demo_model(target, seed=0, recipe=TINY)
    assert not leftover.exists(), "the next build clears what a dead build left"


def test_a_directory_with_other_files_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidParameterError) as error:
        build_demo_model(tmp_path, recipe=TINY)
    assert error.value.field == "out_dir"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_recipe_and_seed_are_rejected_naming_the_field() -> None:
    with pytest.raises(InvalidParameterError) as error:
        DemoModelRecipe(hidden_size=256, num_heads=3)
    assert error.value.field == "recipe.num_heads"
    with pytest.raises(InvalidParameterError) as error:
        DemoModelRecipe(train_steps=0)
    assert error.value.field == "recipe.train_steps"
    with pytest.raises(InvalidParameterError) as error:
        build_demo_model(seed=-1)
    assert error.value.field == "seed"


def test_default_directory_honours_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_demo_model_dir(3) == tmp_path / "tokenline" / "demo-model-v1-seed3"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_demo_model_dir(0) == Path.home() / ".cache" / "tokenline" / "demo-model-v1-seed0"


def test_held_out_pairs_never_appear_in_training() -> None:
    held_out = set(addition_pairs(held_out=True)) | {("count", *p) for p in counting_pairs(held_out=True)}
    assert 0.05 < len(addition_pairs(held_out=True)) / 10_000 < 0.15
    for row in TrainingStream(seed=0).take(20_000):
        example = row.example
        if example.task is Task.ADDITION:
            left, right = example.prompt.rstrip("=").split("+")
            assert (int(left), int(right)) not in held_out
        elif example.task is Task.COUNTING:
            first, second = (int(n) for n in example.prompt.removeprefix("Count: ").split()[:2])
            assert ("count", first, second - first) not in held_out


def test_a_packed_row_computes_exactly_what_it_computes_alone(tiny_model: Path) -> None:
    encoder = RowEncoder(tiny_model)
    rows = [encoder.encode(row) for row in TrainingStream(seed=3).take(24)]
    special = SpecialTokenIds(pad=0, bos=1, eos=2)
    model = initial_model(llama_config(TINY, vocab_size=400, special_ids=special), seed=0)
    batch = pack(rows, pad_id=special.pad, width=48)
    assert batch.input_ids.shape[0] < len(rows)  # rows really share sequences
    with torch.no_grad():
        packed = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask
        ).logits
        for p in range(batch.input_ids.shape[0]):
            starts = [int(i) for i in (batch.position_ids[p] == 0).nonzero()]
            for start, end in zip(starts, [*starts[1:], batch.input_ids.shape[1]], strict=True):
                alone = model(input_ids=batch.input_ids[p : p + 1, start:end]).logits[0]
                torch.testing.assert_close(packed[p, start:end], alone, rtol=1e-4, atol=1e-5)


def test_evaluation_rejects_bad_arguments(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError) as error:
        evaluate_demo_model(tiny_model, num_examples=0)
    assert error.value.field == "num_examples"
    with pytest.raises(InvalidParameterError) as error:
        evaluate_demo_model(tmp_path)
    assert error.value.field == "path"


def test_default_model_is_far_above_chance_on_held_out_examples(default_model: Path) -> None:
    # Measured at 91-95% over seeds (chance 0.6%); the bounds leave room for other CPUs' rounding.
    report = evaluate_demo_model(default_model, num_examples=100)
    assert report.held_out_chance < 0.01
    assert report.held_out_accuracy >= 0.8, report
    for task in report.tasks:
        assert task.accuracy >= 0.6, task
    assert report.task("facts").accuracy >= 0.9
    recorded = read_metadata(default_model)
    assert recorded is not None and recorded["evaluation"]["held_out_accuracy"] >= 0.8


def test_default_model_answers_by_itself_and_stops(default_model: Path) -> None:
    """Plain ``generate`` with the checkpoint's own generation config (greedy, EOS) stops after the answer."""
    tokenizer = AutoTokenizer.from_pretrained(str(default_model), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(default_model), local_files_only=True)
    prompt = tokenizer("12+35=", return_tensors="pt")
    # transformers 5 annotates generate's self as a protocol its own models do not satisfy.
    output = model.generate(**prompt, max_new_tokens=8)  # type: ignore[misc]
    assert tokenizer.decode(output[0, prompt.input_ids.shape[1] :]) == "47</s>"
