"""The sampler at the far ends of the valid parameter ranges (no stack needed).

Proto floats are float32, so a client can send a temperature or a repetition penalty as
small as 1e-45 or as large as 3.4e38. Dividing logits by such values overflows to inf, and
a softmax over inf is NaN: every token ties and the "sample" is token 0. These tests pin
the behaviour the parameters ask for instead.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.sampler import Sampler, draw_seed
from services.engine.sequence import Sequence
from services.messages import MAX_SEED, SamplingParams

F32_TINY = 1.401298464324817e-45
F32_MAX = 3.4028234663852886e38
LOGITS = [1.0, 5.0, 2.0, -3.0, 4.5]  # token 1 is the most likely


def sequence(params: SamplingParams, seed: int, prompt: list[int] | None = None) -> Sequence:
    prompt = prompt or [0]
    return Sequence("r", list(prompt), len(prompt), params, seed, priority=0, arrival_order=0)


def sample(params: SamplingParams, seed: int, prompt: list[int] | None = None) -> int:
    logits = torch.tensor([LOGITS], dtype=torch.float32)
    (token,) = Sampler(torch.device("cpu")).sample(logits, [sequence(params, seed, prompt)])
    return token.token_id


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, MAX_SEED), temperature=st.sampled_from([F32_TINY, 1e-40, 1e-38]))
def test_a_temperature_near_zero_picks_the_most_likely_token(seed: int, temperature: float) -> None:
    assert sample(SamplingParams(temperature=temperature), seed) == 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, MAX_SEED))
def test_a_repetition_penalty_near_zero_picks_a_seen_token(seed: int) -> None:
    """A penalty below 1 favours tokens already seen; near 0 it makes a seen token with a
    positive logit (token 2 here) certain, instead of a NaN draw."""
    params = SamplingParams(temperature=1.0, repetition_penalty=F32_TINY)
    assert sample(params, seed, prompt=[2]) == 2


@pytest.mark.parametrize("penalty", [F32_TINY, F32_MAX])
@pytest.mark.parametrize("temperature", [F32_TINY, 1.0, F32_MAX])
def test_extreme_penalties_and_temperatures_give_finite_logprobs(penalty: float, temperature: float) -> None:
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, logprobs=2)
    logits = torch.tensor([LOGITS], dtype=torch.float32)
    (token,) = Sampler(torch.device("cpu")).sample(logits, [sequence(params, 3, prompt=[2, 3])])
    assert 0 <= token.token_id < len(LOGITS)
    assert token.logprob is not None and torch.isfinite(torch.tensor(token.logprob))


def test_ordinary_temperatures_are_unchanged() -> None:
    """The overflow guard leaves every ordinary draw as it was: the same draws as dividing
    by the temperature directly (the reproducibility promise of seeded sampling)."""
    for seed in range(50):
        params = SamplingParams(temperature=0.8, top_k=4)
        scores = torch.tensor(LOGITS) / 0.8
        kth = torch.topk(scores, 4).values[-1]
        probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
        generator = torch.Generator().manual_seed(draw_seed(seed, 0))
        race = torch.empty_like(probs).exponential_(generator=generator)
        assert sample(params, seed) == int((probs / race).argmax())
