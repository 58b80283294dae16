"""Counting the commands a stack runs, from a real redis-server's own statistics."""

from __future__ import annotations

import pytest
import redis

from loadtest.redis_commands import command_calls, commands_per_request


def test_commands_per_request_counts_what_redis_ran_scripts_included(redis_url: str) -> None:
    before = command_calls(redis_url)
    with redis.Redis.from_url(redis_url) as client:
        for _ in range(6):
            client.hlen("counted")
        client.eval("redis.call('XADD', KEYS[1], '*', 'a', '1') return 1", 1, "counted-stream")
    counted = commands_per_request(before, command_calls(redis_url), requests=3)
    by_command = counted["by_command"]
    assert by_command["hlen"] == pytest.approx(2.0)
    assert by_command["xadd"] == pytest.approx(1 / 3), "a command inside a script counts"
    assert by_command["eval"] == pytest.approx(1 / 3)
    assert "info" not in by_command and "client" not in by_command, "the readings are left out"
    assert next(iter(by_command)) == "hlen", "most frequent first"
    assert counted["total"] == pytest.approx(sum(by_command.values()))
    with pytest.raises(ValueError):
        commands_per_request(before, before, requests=0)
