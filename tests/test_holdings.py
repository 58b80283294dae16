"""An engine replica's books between writes (services/engine/holdings.py): what a write
carries, and that a failed write gives back exactly what it took."""

from __future__ import annotations

from services.engine.holdings import Holdings
from services.engine.outputs import RequestOutput
from services.messages import FinishReason, TokenChunk


def _output(
    request_id: str, start: int, ids: tuple[int, ...], finish: FinishReason | None = None
) -> RequestOutput:
    return RequestOutput(request_id, start, ids, finish, num_prompt_tokens=3, num_cached_tokens=0)


def _two_held() -> Holdings:
    holdings = Holdings()
    holdings.hold("a", "0-1", num_prompt_tokens=3)
    holdings.hold("b", "0-2", num_prompt_tokens=3)
    return holdings


def test_a_write_carries_the_step_acknowledges_the_finished_and_polls_the_rest() -> None:
    holdings = _two_held()
    produced = holdings.record([_output("a", 0, (7, 8)), _output("b", 0, (9,), FinishReason.LENGTH)])
    write = holdings.take_write(poll_cancels=True)
    assert produced == 3
    assert write is not None
    assert [(c.request_id, c.token_ids) for c in write.chunks] == [("a", (7, 8)), ("b", (9,))]
    assert write.acknowledged == {"b": "0-2"}
    assert write.running == ["a"]
    assert holdings.take_write(poll_cancels=False) is None  # the outbox went into the write


def test_a_failed_write_puts_its_chunks_back_in_order_and_its_acknowledgements_ride_the_next() -> None:
    holdings = _two_held()
    holdings.record([_output("a", 0, (7,)), _output("b", 0, (9,), FinishReason.STOP)])
    failed = holdings.take_write(poll_cancels=True)
    assert failed is not None
    holdings.record([_output("a", 1, (8,))])  # the engine stepped on while the write was out
    holdings.not_written(failed.chunks, failed.acknowledged)

    assert holdings.owes_redis
    retry = holdings.take_write(poll_cancels=False)
    assert retry is not None
    assert [(c.request_id, c.start_index) for c in retry.chunks] == [("a", 0), ("b", 0), ("a", 1)]
    assert retry.acknowledged == {"b": "0-2"}
    holdings.written(retry.acknowledged)
    assert set(holdings.held) == {"a"}
    assert not holdings.owes_redis


def test_an_ended_request_gets_a_final_chunk_at_its_next_index_with_its_usage() -> None:
    holdings = _two_held()
    holdings.record([_output("a", 0, (7, 8, 9))])
    holdings.take_write(poll_cancels=False)
    holdings.end("a", FinishReason.ABORT)
    write = holdings.take_write(poll_cancels=False)
    assert write is not None
    final = write.chunks[0]
    assert final == TokenChunk("a", 3, (), FinishReason.ABORT, final.usage, "")
    assert final.usage is not None and (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 3)
    assert write.acknowledged == {"a": "0-1"}


def test_output_of_a_request_no_longer_held_is_not_written() -> None:
    holdings = _two_held()
    holdings.drop("b")  # its lease was lost while the step ran
    assert holdings.record([_output("a", 0, (7,)), _output("b", 0, (9,))]) == 1
    write = holdings.take_write(poll_cancels=True)
    assert write is not None and [c.request_id for c in write.chunks] == ["a"]


def test_a_reclaimed_request_that_already_finished_is_only_acknowledged() -> None:
    holdings = Holdings()
    holdings.finished_elsewhere("c", "0-9")
    write = holdings.take_write(poll_cancels=True)
    assert write is not None
    assert (write.chunks, write.acknowledged, write.running) == ([], {"c": "0-9"}, [])
