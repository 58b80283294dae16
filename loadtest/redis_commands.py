"""The Redis commands a stack runs, as Redis itself counts them (``INFO commandstats``).

Unlike CPU seconds, these counts do not move with the machine's load, so a change that saves
round trips (or commands inside scripts, which Redis counts too) shows in one run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

# The counting itself: each reading opens a connection (redis-py's handshake sends CLIENT
# commands) and runs INFO. Connection handshakes of the stack are left out with them.
_OWN_COMMANDS = {"info", "client"}


def command_calls(redis_url: str) -> dict[str, int]:
    """Calls per command since the server started (or its stats were reset)."""
    with redis.Redis.from_url(redis_url) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def commands_per_request(
    before: Mapping[str, int], after: Mapping[str, int], requests: int
) -> dict[str, Any]:
    """Commands per request between two ``command_calls`` readings: the total and each
    command's share, most frequent first (commands run inside Lua scripts included)."""
    if requests <= 0:
        raise ValueError(f"requests must be > 0, got {requests}")
    ran = {
        name: after[name] - before.get(name, 0)
        for name in after
        if name not in _OWN_COMMANDS and after[name] > before.get(name, 0)
    }
    by_command = {name: count / requests for name, count in sorted(ran.items(), key=lambda kv: -kv[1])}
    return {"requests": requests, "total": sum(by_command.values()), "by_command": by_command}
