"""Tokenizer calls through Redis: the ingress's caller, the replica's stage, the wire format.

Real redis-server and the demo checkpoint's real tokenizer; the stage runs as it does in a
tokenizer replica, minus Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
import redis

from services.errors import InvalidParameterError, QueueUnavailableError
from services.ingress.status import rpc_error_for
from services.queue.config import QueueConfig
from services.queue.keys import TOKENIZER_GROUP, QueueKeys
from services.queue.tokenize_calls import TokenizeCaller, TokenizeCalls
from services.tokenizer import wire
from services.tokenizer.prompt import ChatMessage, ChatPrompt, Prompt, TextPrompt, TokenIdsPrompt
from services.tokenizer.replies import Encoded
from services.tokenizer.stage import EncodeMany, TokenizeStage
from services.tokenizer.tokenizer import PromptTokenizer
from services.tokenizer.wire import TokenizerCallFailedError

MODEL = "demo"


def run(case: Coroutine[Any, Any, None]) -> None:
    asyncio.run(case)


def real_encoder(checkpoint: Path) -> EncodeMany:
    tokenizer = PromptTokenizer(checkpoint)

    async def encode_many(prompts: list[tuple[str, Prompt]]) -> list[Encoded]:
        encoded = tokenizer.encode_batch([prompt for _, prompt in prompts])
        return [
            Encoded(error=item) if isinstance(item, InvalidParameterError) else Encoded(tuple(item))
            for item in encoded
        ]

    return encode_many


@contextlib.asynccontextmanager
async def running_stage(
    redis_url: str,
    config: QueueConfig,
    checkpoint: Path,
    consumer: str,
    encode_many: EncodeMany | None = None,
) -> AsyncIterator[None]:
    async with TokenizeCalls(redis_url, config) as calls:
        encode = encode_many or real_encoder(checkpoint)
        stage = TokenizeStage(calls, consumer, encode, config.tokenize_reclaim_s)
        task = asyncio.get_running_loop().create_task(stage.run())
        try:
            yield
        finally:
            stage.stop()  # as the replica stops it
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            assert task.done(), "the stage must end within a read once stopped"


def test_a_call_is_answered_with_the_ids_the_tokenizer_gives(redis_url: str, demo_model_dir: Path) -> None:
    config = QueueConfig()
    prompts: list[tuple[str, Prompt]] = [
        (MODEL, TextPrompt("12+34=")),
        (MODEL, ChatPrompt([ChatMessage("user", "7*6=")])),
        (MODEL, TokenIdsPrompt([5, 6, 7])),
    ]
    expected = [tuple(PromptTokenizer(demo_model_dir).encode(prompt)) for _, prompt in prompts]

    async def case() -> None:
        stage = running_stage(redis_url, config, demo_model_dir, "tok-a")
        async with stage, TokenizeCaller(redis_url, config, "ingress-a") as caller:
            replies = wire.decode_reply(await caller.call(wire.encode_call(prompts)))
            again = wire.decode_reply(await caller.call(wire.encode_call(prompts[:1])))
        assert [reply.token_ids for reply in replies] == expected
        assert [reply.error for reply in replies] == [None, None, None]
        assert again[0].token_ids == expected[0]

    run(case())
    with redis.Redis.from_url(redis_url) as raw:
        calls_key = QueueKeys(config.key_prefix).tokenize_calls
        assert raw.xlen(calls_key) == 0, "answered calls are dropped from the stream"
        assert raw.exists(QueueKeys(config.key_prefix).tokenize_replies("ingress-a")) == 0, (
            "closed caller's stream"
        )


def test_a_bad_prompt_comes_back_as_the_same_typed_error(redis_url: str, demo_model_dir: Path) -> None:
    """The status the ingress builds from the error that crossed Redis is the one it would
    build from the tokenizer's own error: field, reason and the short form of the value."""
    config = QueueConfig()
    bad = TokenIdsPrompt([])
    try:
        PromptTokenizer(demo_model_dir).encode(bad)
    except InvalidParameterError as error:
        direct = rpc_error_for(error)
    else:
        pytest.fail("an empty id list must be refused")

    async def case() -> list[Encoded]:
        stage = running_stage(redis_url, config, demo_model_dir, "tok-a")
        async with stage, TokenizeCaller(redis_url, config, "ingress-a") as caller:
            return wire.decode_reply(
                await caller.call(wire.encode_call([(MODEL, bad), (MODEL, TextPrompt("1+1="))]))
            )

    replies = asyncio.run(case())
    assert replies[0].error is not None and replies[1].error is None
    assert replies[0].error.field == "prompt"
    crossed = rpc_error_for(replies[0].error)
    assert (crossed.code, crossed.details) == (direct.code, direct.details)


def test_a_call_left_by_a_dead_replica_is_taken_over(redis_url: str, demo_model_dir: Path) -> None:
    """A replica that took a call and died never answers; a live one answers it once the call
    has waited tokenize_reclaim_s."""
    config = QueueConfig(tokenize_reclaim_s=0.3, tokenize_timeout_s=20.0)

    async def case() -> None:
        async with (
            TokenizeCaller(redis_url, config, "ingress-a") as caller,
            TokenizeCalls(redis_url, config) as dead,
        ):
            await dead.ensure_group()
            call = asyncio.get_running_loop().create_task(
                caller.call(wire.encode_call([(MODEL, TextPrompt("9-4="))]))
            )
            taken: list[Any] = []
            while not taken:  # the doomed replica takes the call and never answers
                taken = await dead.take("tok-dead", 8, 100)
            async with running_stage(redis_url, config, demo_model_dir, "tok-live"):
                reply = wire.decode_reply(await asyncio.wait_for(call, 10))
            assert reply[0].token_ids == tuple(PromptTokenizer(demo_model_dir).encode(TextPrompt("9-4=")))

    run(case())
    with redis.Redis.from_url(redis_url) as raw:
        pending = raw.xpending(QueueKeys(QueueConfig().key_prefix).tokenize_calls, TOKENIZER_GROUP)
        assert pending["pending"] == 0


def test_no_tokenizer_running_means_unavailable_after_the_timeout(redis_url: str) -> None:
    config = QueueConfig(tokenize_timeout_s=0.3)

    async def case() -> None:
        async with TokenizeCaller(redis_url, config, "ingress-a") as caller:
            with pytest.raises(QueueUnavailableError, match="no tokenizer replica answered"):
                await caller.call(wire.encode_call([(MODEL, TextPrompt("1+2="))]))

    run(case())


def test_a_malformed_entry_is_dropped_and_the_stage_keeps_serving(
    redis_url: str, demo_model_dir: Path
) -> None:
    config = QueueConfig()
    calls_key = QueueKeys(config.key_prefix).tokenize_calls

    async def case() -> None:
        async with running_stage(redis_url, config, demo_model_dir, "tok-a"):
            with redis.Redis.from_url(redis_url) as raw:
                raw.xadd(calls_key, {"something": "else"})
            async with TokenizeCaller(redis_url, config, "ingress-a") as caller:
                reply = wire.decode_reply(await caller.call(wire.encode_call([(MODEL, TextPrompt("3+3="))])))
        assert reply[0].error is None and reply[0].token_ids

    run(case())
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.xlen(calls_key) == 0


def test_a_call_the_tokenizer_fails_is_answered_as_failed_once(redis_url: str, demo_model_dir: Path) -> None:
    """A whole call that cannot be encoded (say a variant's tokenizer fails to load) comes back
    as a typed failure and leaves the stream: no replica takes it again and again."""
    config = QueueConfig(tokenize_reclaim_s=0.2)
    attempts: list[int] = []

    async def broken(prompts: list[tuple[str, Prompt]]) -> list[Encoded]:
        attempts.append(len(prompts))
        raise OSError("tokenizer.json unreadable")

    async def case() -> None:
        stage = running_stage(redis_url, config, demo_model_dir, "tok-a", broken)
        async with stage, TokenizeCaller(redis_url, config, "ingress-a") as caller:
            with pytest.raises(TokenizerCallFailedError, match=r"OSError: tokenizer\.json unreadable"):
                wire.decode_reply(await caller.call(wire.encode_call([(MODEL, TextPrompt("2+2="))])))
            await asyncio.sleep(3 * config.tokenize_reclaim_s)  # time for a takeover, were it pending

    run(case())
    assert attempts == [1]
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.xlen(QueueKeys(config.key_prefix).tokenize_calls) == 0
