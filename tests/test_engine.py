"""The engine core on real (tiny, random-init) Hugging Face checkpoints, on CPU."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine import EngineConfig, FinishReason, SamplingParams
from services.engine.engine import Engine
from services.errors import InvalidParameterError
from tests.checkpoints import make_tiny_checkpoint

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENGTHS = [1, 7, 16, 33, 70]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-ckpt")
    return {kind: make_tiny_checkpoint(kind, root / kind, seed=11) for kind in FAMILIES}


def make_engine(model_dir: Path, **overrides: object) -> Engine:
    settings: dict[str, object] = {"model": str(model_dir), "num_kv_blocks": 256, "block_size": 8}
    settings.update(overrides)
    return Engine(EngineConfig(**settings))  # type: ignore[arg-type]


@pytest.fixture
def engine(checkpoints: dict[str, Path]) -> Iterator[Engine]:
    eng = make_engine(checkpoints["llama"])
    yield eng
    assert not eng.has_unfinished()
    assert eng.block_manager.num_used_blocks == 0, "block accounting must return to zero"


def prompts_for(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Token 0..2 are often special in the tiny configs; keep prompts to ordinary ids.
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family: str, checkpoints: dict[str, Path]) -> None:
    eng = make_engine(checkpoints[family])
    prompts = prompts_for(eng.spec.vocab_size, PROMPT_LENGTHS, seed=3)
    ours = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, ours, strict=True):
        expected = hf_greedy(checkpoints[family], prompt, 24)
        # HF pads nothing at batch 1 and stops at EOS like we do; the EOS id is part of both.
        assert out.token_ids == expected[: len(out.token_ids)]
        assert len(out.token_ids) == len(expected)
    assert eng.block_manager.num_used_blocks == 0


def test_batched_equals_one_at_a_time(engine: Engine) -> None:
    prompts = prompts_for(engine.spec.vocab_size, [5, 40, 12, 64, 3], seed=5)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    together = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone


def test_seeded_sampling_does_not_depend_on_batch(engine: Engine) -> None:
    vocab = engine.spec.vocab_size
    target = prompts_for(vocab, [21], seed=9)[0]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([target], params)[0].token_ids
    crowd = prompts_for(vocab, [4, 50, 13], seed=10)
    others = [SamplingParams(max_tokens=30, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    mixed = engine.generate([crowd[0], target, *crowd[1:]], [others[0], params, *others[1:]])
    assert mixed[1].token_ids == alone
    different_seed = engine.generate(
        [target],
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=4321, ignore_eos=True),
    )[0].token_ids
    assert different_seed != alone  # the seed matters


def test_forced_preemption_gives_identical_outputs(checkpoints: dict[str, Path]) -> None:
    roomy = make_engine(checkpoints["llama"])
    tight = make_engine(checkpoints["llama"], num_kv_blocks=14, max_num_seqs=8, max_num_batched_tokens=64)
    prompts = prompts_for(roomy.spec.vocab_size, [20, 25, 30, 18, 22, 27], seed=12)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.stats.preemptions > 0, "the tight cache must have forced preemption"
    assert got == expected
    assert tight.block_manager.num_used_blocks == 0


def test_chunked_prefill_gives_identical_outputs(checkpoints: dict[str, Path]) -> None:
    whole = make_engine(checkpoints["qwen3"])
    chunked = make_engine(checkpoints["qwen3"], max_num_seqs=4, max_num_batched_tokens=16)
    prompts = prompts_for(whole.spec.vocab_size, [90, 45, 3], seed=13)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == [
        o.token_ids for o in whole.generate(prompts, params)
    ]
    assert chunked.stats.steps > whole.stats.steps


def test_prefix_cache_hit_is_identical_and_computes_fewer_tokens(engine: Engine) -> None:
    prompt = prompts_for(engine.spec.vocab_size, [60], seed=14)[0]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first = engine.generate([prompt], params)[0]
    computed_before = engine.stats.prefill_tokens_computed
    second = engine.generate([prompt], params)[0]
    computed_second = engine.stats.prefill_tokens_computed - computed_before
    assert second.token_ids == first.token_ids
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 56  # 7 full blocks of 8; the last token is always computed
    assert computed_second == len(prompt) - 56


def test_prefix_caching_off_computes_everything(checkpoints: dict[str, Path]) -> None:
    eng = make_engine(checkpoints["llama"], enable_prefix_caching=False)
    prompt = prompts_for(eng.spec.vocab_size, [40], seed=15)[0]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng.generate([prompt], params)
    out = eng.generate([prompt], params)[0]
    assert out.num_cached_tokens == 0
    assert eng.stats.prefill_tokens_computed == 2 * len(prompt)


def test_abort_frees_blocks_at_once(engine: Engine) -> None:
    prompt = prompts_for(engine.spec.vocab_size, [30], seed=16)[0]
    engine.add_request("victim", prompt, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort("victim")
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished()
    assert not engine.abort("victim")


def test_lower_priority_value_runs_first(checkpoints: dict[str, Path]) -> None:
    eng = make_engine(checkpoints["llama"], max_num_seqs=1, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = prompts_for(eng.spec.vocab_size, [5], seed=17)[0]
    eng.add_request("late-but-urgent", prompt, params, priority=0)
    eng.add_request("background", prompt, params, priority=5)
    eng.add_request("urgent-2", prompt, params, priority=0)
    order: list[str] = []
    while eng.has_unfinished():
        order.extend(o.request_id for o in eng.step() if o.finished)
    assert order == ["late-but-urgent", "urgent-2", "background"]


def test_stop_token_and_max_tokens_finish_reasons(engine: Engine) -> None:
    prompt = prompts_for(engine.spec.vocab_size, [9], seed=18)[0]
    free_run = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert free_run.finish_reason is FinishReason.LENGTH and len(free_run.token_ids) == 8
    stop_at = free_run.token_ids[3]
    stopped = engine.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,))
    )[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free_run.token_ids[: free_run.token_ids.index(stop_at) + 1]


def test_resume_from_output_prefix_continues_identically(engine: Engine) -> None:
    prompt = prompts_for(engine.spec.vocab_size, [17], seed=19)[0]
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=77, ignore_eos=True)
    full = engine.generate([prompt], params)[0].token_ids
    engine.add_request("resumed", prompt, params, output_prefix=full[:7])
    rest: list[int] = []
    first_index = None
    while engine.has_unfinished():
        for out in engine.step():
            first_index = out.start_index if first_index is None else first_index
            rest.extend(out.new_token_ids)
    assert first_index == 7
    assert full[:7] + rest == full


def test_logprobs_are_returned_when_asked(engine: Engine) -> None:
    prompt = prompts_for(engine.spec.vocab_size, [6], seed=20)[0]
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.token_id == token
        assert entry.logprob <= 0.0
        assert len(entry.top) == 3
        assert entry.top[0][0] == token  # greedy picks the most likely token


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": float("nan")}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -2}),
        ("top_k", {"top_k": 0}),
        ("max_tokens", {"max_tokens": 0}),
        ("min_p", {"min_p": 1.5}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("seed", {"seed": -1}),
    ],
)
def test_invalid_sampling_params_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_prompt_longer_than_context_is_rejected(engine: Engine) -> None:
    too_long = [5] * engine.max_model_len
    with pytest.raises(InvalidParameterError) as caught:
        engine.add_request("long", too_long, SamplingParams())
    assert caught.value.field == "prompt"


@pytest.mark.parametrize("bad_id", [-1, 10**9])
def test_token_ids_outside_vocabulary_are_rejected(engine: Engine, bad_id: int) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        engine.add_request("oov", [5, bad_id], SamplingParams())
    assert caught.value.field == "prompt.token_ids"
    assert caught.value.value == bad_id


def test_empty_prompt_and_duplicate_id_are_rejected(engine: Engine) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        engine.add_request("empty", [], SamplingParams())
    assert caught.value.field == "prompt"
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParameterError) as caught:
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    assert caught.value.field == "request_id"
    engine.abort("dup")
