"""The return path on a real redis-server: detokenizer stage ownership and takeover, and one
text reader per ingress replica, fed by real token streams and a real BPE tokenizer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from services.detokenizer.stage import DetokenizerStage
from services.ingress.text_fanout import TextFanout
from services.messages import FinishReason, GenerationRequest, SamplingParams, TextDelta, TokenChunk, Usage
from services.queue import EngineQueue, QueueClient, QueueConfig
from services.queue.detokenizer_queue import DetokenizerQueue
from services.queue.keys import QueueKeys
from services.tokenizer.tokenizer import PromptTokenizer
from tests.bpe_tokenizer import write_bpe_checkpoint

MODEL = "demo"
TEXT = "今天天气很好 — Zürich 👍🏽, then some plain words and 日本語 again."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    directory: Path = write_bpe_checkpoint(tmp_path_factory.mktemp("bpe"))
    return PromptTokenizer(directory)


def _enqueue(url: str, config: QueueConfig, request_ids: list[str], stop: tuple[str, ...] = ()) -> None:
    async def main() -> None:
        async with QueueClient(url, config) as client:
            for request_id in request_ids:
                params = SamplingParams(temperature=0.0, max_tokens=500, stop=stop)
                await client.enqueue(GenerationRequest(request_id, MODEL, (1, 2, 3), params))

    asyncio.run(main())


def _write_tokens(url: str, request_id: str, ids: list[int], start: int, final: bool) -> None:
    with EngineQueue(url) as queue:
        finish = FinishReason.LENGTH if final else None
        usage = Usage(3, start + len(ids)) if final else None
        queue.append([TokenChunk(request_id, start, tuple(ids), finish, usage)])


def _text_entries(url: str, request_id: str) -> list[TextDelta]:
    from services.queue import codec

    with redis.Redis.from_url(url) as client:
        entries = client.xrange(QueueKeys().text(request_id))
    return [codec.decode_text_delta(request_id, fields) for _, fields in entries]


def _stage(url: str, config: QueueConfig, tokenizer: PromptTokenizer, consumer: str) -> DetokenizerStage:
    queue = DetokenizerQueue(url, config)
    queue.ensure_group()
    return DetokenizerStage({MODEL: tokenizer}, queue, consumer, config.lease_s)


def test_one_stage_renders_many_requests_exactly(redis_url: str, tokenizer: PromptTokenizer) -> None:
    config = QueueConfig()
    ids = tokenizer.encode_text(TEXT, add_special_tokens=False)
    requests = [f"r{i}" for i in range(20)]
    _enqueue(redis_url, config, requests)
    stage = _stage(redis_url, config, tokenizer, "a")
    for start in range(0, len(ids), 3):  # chunks of three tokens, as steps write them
        for request_id in requests:
            _write_tokens(redis_url, request_id, ids[start : start + 3], start, start + 3 >= len(ids))
        stage.turn()
    while stage.owned_request_ids:
        stage.turn()
    for request_id in requests:
        entries = _text_entries(redis_url, request_id)
        assert "".join(e.text for e in entries) == tokenizer.decode(ids)
        starts = [e.token_index for e in entries]
        assert starts == sorted(starts) and entries[-1].finish_reason == FinishReason.LENGTH
        assert [t for e in entries for t in e.token_ids] == ids, "every token once, in order"


def test_takeover_rebuilds_state_from_the_token_stream(redis_url: str, tokenizer: PromptTokenizer) -> None:
    """Replica A renders half of the output and dies (stops renewing); B takes the request over
    after the lease and continues the text stream with no gap and no repeat."""
    config = QueueConfig(lease_s=0.3)
    ids = tokenizer.encode_text(TEXT, add_special_tokens=False)
    half = len(ids) // 2
    _enqueue(redis_url, config, ["t"])
    dead = _stage(redis_url, config, tokenizer, "dead")
    _write_tokens(redis_url, "t", ids[:half], 0, final=False)
    dead.turn()
    dead.turn()
    assert dead.owned_request_ids == ("t",)
    written = _text_entries(redis_url, "t")
    assert written, "the first owner wrote text before it died"
    _write_tokens(redis_url, "t", ids[half:], half, final=True)
    live = _stage(redis_url, config, tokenizer, "live")
    live.turn()
    assert live.owned_request_ids == (), "a held assignment is not taken before its lease runs out"
    for _ in range(50):
        asyncio.run(asyncio.sleep(0.05))
        live.turn()
        if not live.owned_request_ids and _text_entries(redis_url, "t")[-1].finish_reason:
            break
    entries = _text_entries(redis_url, "t")
    assert "".join(e.text for e in entries) == tokenizer.decode(ids)
    assert [t for e in entries for t in e.token_ids] == ids
    with redis.Redis.from_url(redis_url) as client:
        assert client.xpending(QueueKeys().detokenizer_assignments, "detokenizers")["pending"] == 0


def test_stop_string_ends_the_text_and_cancels_the_engine(redis_url: str, tokenizer: PromptTokenizer) -> None:
    config = QueueConfig()
    ids = tokenizer.encode_text(TEXT, add_special_tokens=False)
    _enqueue(redis_url, config, ["s"], stop=("Zürich",))
    stage = _stage(redis_url, config, tokenizer, "a")
    _write_tokens(redis_url, "s", ids, 0, final=False)
    stage.turn()
    stage.turn()
    entries = _text_entries(redis_url, "s")
    assert "".join(e.text for e in entries) == TEXT.split("Zürich")[0]
    assert entries[-1].matched_stop == "Zürich" and entries[-1].finish_reason == FinishReason.STOP
    with redis.Redis.from_url(redis_url) as client:
        assert client.sismember(QueueKeys().for_model(MODEL).cancelled, "s"), "the engine is told to stop"


def test_one_reader_feeds_512_open_streams_with_few_connections(redis_url: str) -> None:
    """512 calls follow their text on one QueueClient: every stream completes in order, and
    the client never holds more than a handful of Redis connections."""
    count, pieces = 512, 6
    config = QueueConfig()
    keys = QueueKeys()

    async def main() -> tuple[list[str], int]:
        async with QueueClient(redis_url, config) as client:
            fanout = TextFanout(client, keys.wake("test-ingress"), outage_limit_s=5.0)

            async def follow(request_id: str) -> str:
                received = []
                async for delta in fanout.follow(request_id):
                    received.append(delta.text)
                return "".join(received)

            followers = [asyncio.create_task(follow(f"f{i}")) for i in range(count)]
            await asyncio.sleep(0.2)
            peak = 0
            with redis.Redis.from_url(redis_url) as writer:
                for piece in range(pieces):
                    pipe = writer.pipeline(transaction=False)
                    for i in range(count):
                        final = piece == pieces - 1
                        fields = {"s": str(piece).encode(), "t": b"\0\0\0\0", "x": f"<{piece}>".encode()}
                        if final:
                            fields["f"] = b"length"
                        pipe.xadd(keys.text(f"f{i}"), fields)
                    pipe.execute()
                    await asyncio.sleep(0.05)
                    peak = max(peak, sum(1 for c in writer.client_list() if c["cmd"] != "client|list"))
            texts = await asyncio.gather(*followers)
            await fanout.aclose()
            return texts, peak

    texts, peak_connections = asyncio.run(main())
    assert texts == ["".join(f"<{p}>" for p in range(pieces))] * count
    assert peak_connections <= 8, f"{peak_connections} Redis connections for {count} open streams"


def test_a_resume_inside_a_delta_cuts_tokens_and_text_at_the_piece() -> None:
    """Pieces of one token each (as engine steps write them): a cut at any index gives exactly
    the tokens from there and the text those tokens completed (held-back text moves with the
    token that completes it)."""
    delta = TextDelta(
        "r", text="ab€d", token_ids=(5, 6, 7, 8), token_index=10, pieces=((1, 2), (1, 0), (1, 1), (1, 1))
    )
    assert delta.from_token(10) == delta
    cut = delta.from_token(12)
    assert cut is not None and (cut.token_ids, cut.text, cut.token_index) == ((7, 8), "€d", 12)
    cut = delta.from_token(11)
    assert cut is not None and (cut.token_ids, cut.text) == ((6, 7, 8), "€d")
    assert delta.from_token(14) is None, "nothing left and not the last delta"
    last = TextDelta("r", text="xy", token_ids=(1, 2), token_index=0, finish_reason=FinishReason.LENGTH)
    end = last.from_token(99)
    assert end is not None and (end.token_ids, end.text, end.finish_reason) == ((), "", FinishReason.LENGTH)


def test_reader_drops_text_written_twice_for_the_same_tokens(redis_url: str) -> None:
    """Two detokenizer replicas that both held a request for a moment write overlapping
    entries; the client still sees every token once, in order."""
    keys = QueueKeys()

    async def main() -> list[TextDelta]:
        async with QueueClient(redis_url, QueueConfig()) as client:
            fanout = TextFanout(client, keys.wake("dup-ingress"), outage_limit_s=5.0)
            with redis.Redis.from_url(redis_url) as writer:
                for start, text, final in (
                    (0, "ab", False),
                    (0, "ab", False),
                    (1, "bc", False),
                    (2, "c!", True),
                ):
                    fields = {"s": str(start).encode(), "x": text.encode(), "t": b"\0\0\0\0\0\0\0\0"}
                    fields["o"] = b"\1\0\0\0\1\0\0\0\1\0\0\0\1\0\0\0"  # one token and one char per piece
                    if final:
                        fields["f"] = b"length"
                    writer.xadd(keys.text("dup"), fields)
            deltas = [delta async for delta in fanout.follow("dup")]
            await fanout.aclose()
            return deltas

    deltas = asyncio.run(main())
    assert [d.token_index for d in deltas] == [0]
    assert "".join(d.text for d in deltas) == "abc!" and sum(len(d.token_ids) for d in deltas) == 4


def _messages_per_stream(redis_url: str, streams: int, config: QueueConfig, name: str) -> list[list[str]]:
    """``streams`` calls follow text written one piece every 5 ms (20 pieces); the messages
    each call receives. ``name``: the prefix of their request ids."""
    keys = QueueKeys()

    async def main() -> list[list[str]]:
        async with QueueClient(redis_url, config) as client:
            fanout = TextFanout(client, keys.wake("busy-ingress"), 5.0, config.busy_pause_s)

            async def follow(request_id: str) -> list[str]:
                return [delta.text async for delta in fanout.follow(request_id)]

            followers = [asyncio.create_task(follow(f"{name}{i}")) for i in range(streams)]
            await asyncio.sleep(0.2)
            with redis.Redis.from_url(redis_url) as writer:
                for piece in range(20):
                    pipe = writer.pipeline(transaction=False)
                    for i in range(streams):
                        fields = {"s": str(piece).encode(), "t": b"\0\0\0\0", "x": f"<{piece}>".encode()}
                        if piece == 19:
                            fields["f"] = b"length"
                        pipe.xadd(keys.text(f"{name}{i}"), fields)
                    pipe.execute()
                    await asyncio.sleep(0.005)
            messages = await asyncio.gather(*followers)
            await fanout.aclose()
            return list(messages)

    return asyncio.run(main())


def test_a_busy_reader_sends_fewer_fuller_messages_and_a_lone_stream_each_token(redis_url: str) -> None:
    """busy_read_interval_ms: with busy_read_streams streams open the reader waits between
    reads, so messages carry several pieces (all of them, in order); one stream alone gets a
    message per piece."""
    config = QueueConfig(busy_read_interval_ms=40.0, busy_read_streams=4)
    whole = "".join(f"<{p}>" for p in range(20))
    busy = _messages_per_stream(redis_url, 4, config, "busy")
    assert all("".join(messages) == whole for messages in busy)
    assert max(len(messages) for messages in busy) <= 10, "pieces written 5 ms apart, read every 40 ms"
    (alone,) = _messages_per_stream(redis_url, 1, config, "alone")
    assert "".join(alone) == whole
    assert len(alone) >= 15, f"a lone stream is read at once: {len(alone)} messages for 20 pieces"


def test_a_call_joining_a_pausing_reader_sends_no_wake_up_and_one_joining_a_blocked_read_does(
    redis_url: str,
) -> None:
    """The reader re-reads every open stream after its pause, so a call that joins meanwhile
    needs no wake-up (one round trip saved per call under load); a call that joins while the
    read blocks must wake it, or its text would wait for the read's timeout (1 s)."""
    config = QueueConfig(busy_read_interval_ms=400.0, busy_read_streams=1)
    keys = QueueKeys()
    wake_key = keys.wake("pause-ingress")

    def last_wake(writer: redis.Redis) -> bytes | None:
        newest = writer.xrevrange(wake_key, count=1)
        return newest[0][0] if newest else None

    def write(writer: redis.Redis, request_id: str, piece: int, final: bool) -> None:
        fields = {"s": str(piece).encode(), "t": b"\0\0\0\0", "x": f"<{request_id}{piece}>".encode()}
        if final:
            fields["f"] = b"length"
        writer.xadd(keys.text(request_id), fields)

    async def main() -> tuple[bool, bool, list[str], float]:
        async with QueueClient(redis_url, config) as client:
            fanout = TextFanout(client, wake_key, 5.0, config.busy_pause_s)

            async def follow(request_id: str) -> list[str]:
                return [delta.text async for delta in fanout.follow(request_id)]

            with redis.Redis.from_url(redis_url) as writer:
                first = asyncio.create_task(follow("p0"))
                await asyncio.sleep(0.2)  # the reader blocks on p0's empty stream
                write(writer, "p0", 0, final=False)
                await asyncio.sleep(0.1)  # ... returns with it and pauses 400 ms
                before = last_wake(writer)
                joined_in_pause = asyncio.create_task(follow("p1"))
                await asyncio.sleep(0.05)
                no_wake_in_pause = last_wake(writer) == before
                write(writer, "p1", 0, final=True)
                write(writer, "p0", 1, final=True)
                await asyncio.gather(first, joined_in_pause)
                # Past the last pause nothing is open: the reader blocks on the wake-up stream.
                await asyncio.sleep(0.6)
                before = last_wake(writer)
                joined_blocked = asyncio.create_task(follow("p2"))
                await asyncio.sleep(0.05)
                woke = last_wake(writer) != before
                started = asyncio.get_running_loop().time()
                write(writer, "p2", 0, final=True)
                texts = await joined_blocked
                waited = asyncio.get_running_loop().time() - started
            await fanout.aclose()
            return no_wake_in_pause, woke, texts, waited

    no_wake_in_pause, woke, texts, waited = asyncio.run(main())
    assert no_wake_in_pause, "a call that joined while the reader paused sent a wake-up"
    assert woke, "a call that joined a blocked read did not wake it"
    assert texts == ["<p20>"]
    assert waited < 0.5, f"the woken read took {waited:.2f} s to bring the new call's text"
