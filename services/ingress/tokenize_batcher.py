"""The ingress's calls to the tokenizer replicas, merged while calls are out.

A call has a fixed cost whatever it carries (a round trip through Redis on each side, and
the tokenizer replica's wake-up), and under load it queues for the CPU like everything
else, against ~0.2 ms to encode a prompt. So a prompt goes out at once
while fewer than ``max_calls_in_flight`` calls are out, alone or with every prompt already
waiting; otherwise it waits for a call to come back and goes with the next one. An idle
replica pays no wait: its one prompt leaves at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.tokenizer.prompt import Prompt
from services.tokenizer.replies import Encoded

EncodeMany = Callable[[list[tuple[str, Prompt]]], Awaitable[list[Encoded]]]


@dataclass(frozen=True)
class _Waiting:
    model: str
    prompt: Prompt
    reply: asyncio.Future[Encoded]


class TokenizeBatcher:
    def __init__(self, encode_many: EncodeMany, max_calls_in_flight: int, max_prompts_per_call: int) -> None:
        """``encode_many``: one call to the tokenizer deployment, one reply per prompt, in order."""
        if max_calls_in_flight < 1 or max_prompts_per_call < 1:
            raise ValueError("max_calls_in_flight and max_prompts_per_call must be at least 1")
        self._encode_many = encode_many
        self._max_calls = max_calls_in_flight
        self._max_prompts = max_prompts_per_call
        self._waiting: list[_Waiting] = []
        self._calls_out = 0
        self._calls: set[asyncio.Task[None]] = set()  # held so that a running call is not collected

    async def encode(self, model: str, prompt: Prompt) -> Encoded:
        """The prompt's ids (or its typed error); the call's own failure is raised here."""
        reply: asyncio.Future[Encoded] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(model, prompt, reply))
        self._send_what_fits()
        return await reply

    def _send_what_fits(self) -> None:
        while self._calls_out < self._max_calls:
            # A caller that went away (its client cancelled) no longer needs its prompt encoded.
            self._waiting = [item for item in self._waiting if not item.reply.done()]
            if not self._waiting:
                return
            batch, self._waiting = self._waiting[: self._max_prompts], self._waiting[self._max_prompts :]
            self._calls_out += 1
            call = asyncio.get_running_loop().create_task(self._call(batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[_Waiting]) -> None:
        try:
            replies = await self._encode_many([(item.model, item.prompt) for item in batch])
            if len(replies) != len(batch):
                raise RuntimeError(f"the tokenizer answered {len(replies)} prompts of {len(batch)}")
        except asyncio.CancelledError:  # the replica is stopping: nobody will answer these
            for item in batch:
                item.reply.cancel()
            raise
        except Exception as error:
            for item in batch:
                if not item.reply.done():
                    item.reply.set_exception(error)
        else:
            for item, encoded in zip(batch, replies, strict=True):
                if not item.reply.done():
                    item.reply.set_result(encoded)
        finally:
            self._calls_out -= 1
            self._send_what_fits()
