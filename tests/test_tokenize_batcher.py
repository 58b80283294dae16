"""TokenizeBatcher: prompts leave at once while calls are free, merge while they are not."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from services.errors import InvalidParameterError
from services.ingress.tokenize_batcher import TokenizeBatcher
from services.tokenizer.prompt import Prompt, TextPrompt
from services.tokenizer.replies import Encoded


class HeldTokenizer:
    """Answers each call with the prompts' lengths as ids, once the test lets that call go."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self._release: list[asyncio.Event] = []

    async def encode_many(self, requests: list[tuple[str, Prompt]]) -> list[Encoded]:
        texts = [prompt.text for _, prompt in requests if isinstance(prompt, TextPrompt)]
        self.calls.append(texts)
        release = asyncio.Event()
        self._release.append(release)
        await release.wait()
        if "bad" in texts:
            raise RuntimeError("tokenizer replica died")
        return [Encoded(token_ids=(len(text),)) for text in texts]

    def release(self, call: int) -> None:
        self._release[call].set()


def in_loop(case: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test case on a fresh event loop."""

    @functools.wraps(case)
    def run() -> None:
        asyncio.run(case())

    return run


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _send(batcher: TokenizeBatcher, *texts: str) -> list[asyncio.Task[Encoded]]:
    """Each text's encode started, in order; returns once the batcher has acted on them."""
    replies = [asyncio.create_task(batcher.encode("demo", TextPrompt(text))) for text in texts]
    await _settle()
    return replies


async def _release(tokenizer: HeldTokenizer, call: int) -> None:
    tokenizer.release(call)
    await _settle()


@in_loop
async def test_a_lone_prompt_leaves_at_once() -> None:
    tokenizer = HeldTokenizer()
    batcher = TokenizeBatcher(tokenizer.encode_many, max_calls_in_flight=1, max_prompts_per_call=8)
    (reply,) = await _send(batcher, "abc")
    assert tokenizer.calls == [["abc"]]
    tokenizer.release(0)
    assert (await reply).token_ids == (3,)


@in_loop
async def test_prompts_arriving_while_the_calls_are_out_go_together_each_with_its_own_reply() -> None:
    tokenizer = HeldTokenizer()
    batcher = TokenizeBatcher(tokenizer.encode_many, max_calls_in_flight=1, max_prompts_per_call=8)
    (first,) = await _send(batcher, "a")
    waiting = await _send(batcher, "xx", "xxx", "xxxx")
    assert tokenizer.calls == [["a"]]  # the one call allowed is out: the others wait
    await _release(tokenizer, 0)
    assert tokenizer.calls == [["a"], ["xx", "xxx", "xxxx"]]
    tokenizer.release(1)
    assert (await first).token_ids == (1,)
    assert [(await reply).token_ids for reply in waiting] == [(2,), (3,), (4,)]


@in_loop
async def test_a_call_carries_at_most_max_prompts_per_call() -> None:
    tokenizer = HeldTokenizer()
    batcher = TokenizeBatcher(tokenizer.encode_many, max_calls_in_flight=2, max_prompts_per_call=2)
    replies = await _send(batcher, "0", "1", "2", "3", "4")
    # The first two leave alone, one per free call; the three that arrive after wait.
    assert tokenizer.calls == [["0"], ["1"]]
    await _release(tokenizer, 0)
    assert tokenizer.calls == [["0"], ["1"], ["2", "3"]]  # two of the three: the most a call carries
    await _release(tokenizer, 1)
    assert tokenizer.calls == [["0"], ["1"], ["2", "3"], ["4"]]
    tokenizer.release(2)
    tokenizer.release(3)
    assert [(await reply).token_ids for reply in replies] == [(1,)] * 5


@in_loop
async def test_a_failed_call_fails_every_prompt_in_it_and_the_next_call_still_goes() -> None:
    tokenizer = HeldTokenizer()
    batcher = TokenizeBatcher(tokenizer.encode_many, max_calls_in_flight=1, max_prompts_per_call=8)
    (held,) = await _send(batcher, "a")
    doomed = await _send(batcher, "bad", "ok")
    await _release(tokenizer, 0)
    tokenizer.release(1)
    for reply in doomed:
        with pytest.raises(RuntimeError, match="tokenizer replica died"):
            await reply
    assert (await held).token_ids == (1,)
    (after,) = await _send(batcher, "after")
    tokenizer.release(2)
    assert (await after).token_ids == (5,)


@in_loop
async def test_a_prompt_whose_caller_went_away_is_not_sent() -> None:
    tokenizer = HeldTokenizer()
    batcher = TokenizeBatcher(tokenizer.encode_many, max_calls_in_flight=1, max_prompts_per_call=8)
    (held,) = await _send(batcher, "a")
    gone, kept = await _send(batcher, "gone", "kept")
    gone.cancel()
    await _release(tokenizer, 0)
    assert tokenizer.calls == [["a"], ["kept"]]
    tokenizer.release(1)
    assert (await kept).token_ids == (4,)
    assert (await held).token_ids == (1,)


@in_loop
async def test_typed_errors_come_back_as_values_for_their_prompt_only() -> None:
    error = InvalidParameterError("prompt", "", "must not be empty")

    async def encode_many(requests: list[tuple[str, Prompt]]) -> list[Encoded]:
        return [Encoded(error=error) if not p.text else Encoded((1,)) for _, p in requests]  # type: ignore[union-attr]

    batcher = TokenizeBatcher(encode_many, max_calls_in_flight=1, max_prompts_per_call=8)
    empty, full = await asyncio.gather(
        batcher.encode("demo", TextPrompt("")), batcher.encode("demo", TextPrompt("x"))
    )
    assert empty.error is error and full.token_ids == (1,)


def test_limits_below_one_are_refused() -> None:
    async def encode_many(requests: list[tuple[str, Prompt]]) -> list[Encoded]:
        return []

    with pytest.raises(ValueError, match="max_calls_in_flight"):
        TokenizeBatcher(encode_many, max_calls_in_flight=0, max_prompts_per_call=8)
