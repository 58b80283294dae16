"""The engine threads' CPU priority (services/engine/cpu_priority.py): per thread, never fatal."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from services.engine.cpu_priority import apply_thread_nice


def _in_new_thread(nice: int) -> tuple[bool, int]:
    """Apply ``nice`` on a fresh thread; what it returned and the thread's nice afterwards."""
    seen: list[tuple[bool, int]] = []

    def run() -> None:
        took = apply_thread_nice(nice)
        seen.append((took, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_a_lower_priority_applies_to_the_calling_thread_only() -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    took, nice = _in_new_thread(before + 5)  # lowering one's own priority needs no privilege
    assert took
    assert nice == before + 5
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_a_higher_priority_takes_with_cap_sys_nice_and_is_refused_quietly_without(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with caplog.at_level(logging.WARNING, logger="services.engine.cpu_priority"):
        took, nice = _in_new_thread(before - 5)
    if os.geteuid() == 0:  # root holds CAP_SYS_NICE
        assert took and nice == before - 5
    else:
        assert not took and nice == before
        assert "CAP_SYS_NICE" in caplog.text


def test_zero_leaves_the_thread_alone() -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _in_new_thread(0) == (True, before)
