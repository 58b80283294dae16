"""What Redis's consumer-group errors mean to the queue's readers (engines, detokenizers,
tokenizers): one place for the two error texts every group reader checks."""

from __future__ import annotations

from redis.exceptions import ResponseError


def is_missing_group(exc: ResponseError) -> bool:
    """The stream or its group does not exist (yet, or any more: Redis restarted empty)."""
    # Raised directly or wrapped in a script error, so match anywhere in the message.
    return "NOGROUP" in str(exc)


def is_existing_group(exc: ResponseError) -> bool:
    """Creating a group that already exists: what ``ensure_group`` wanted is there."""
    return "BUSYGROUP" in str(exc)
