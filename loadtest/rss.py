"""Resident memory of every process of a running stack, sampled over time (Linux /proc).

``stack_processes`` finds the stack's processes under one root (the process that started
it) and names each by its role: a Serve deployment's name for its replicas, ``proxy``,
``controller``, ``raylet``, ``gcs_server``, ``redis-server``. ``RssSampler`` samples their
RSS, and any extra gauges (Redis ``used_memory``), on a background thread; each process
or gauge becomes a ``Series``, whose growth and least-squares slope tell a leak from noise.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from loadtest.proc_cpu import process_label, process_tree

MIB = 1 << 20
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_FIXED_ROLES = {
    "ray::ProxyActor": "proxy",
    "ray::HAProxyManager": "haproxy-manager",
    "haproxy": "haproxy",
    "ray::ServeController": "controller",
    "raylet": "raylet",
    "gcs_server": "gcs_server",
    "redis-server": "redis-server",
}
_REPLICA_TITLE = "ray::ServeReplica:"  # then "<app>:<deployment>"


def stack_role(cmdline: Sequence[str]) -> str | None:
    """The role of a stack process from its command line (Ray retitles its workers), or None
    for processes that are not part of serving (idle workers, Ray's agents, the client)."""
    label = process_label(cmdline)
    if label.startswith(_REPLICA_TITLE):
        return label.rsplit(":", 1)[1]
    return _FIXED_ROLES.get(label)


def stack_processes(root_pid: int) -> dict[int, str]:
    """pid -> role for every stack process under ``root_pid``."""
    found = {pid: stack_role(cmdline) for pid, (_, cmdline) in process_tree(root_pid).items()}
    return {pid: role for pid, role in found.items() if role is not None}


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float:
    """Slope of the least-squares line through ``(x, y)`` points."""
    if len(points) < 2:
        raise ValueError(f"a slope needs 2 points or more, got {len(points)}")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0.0:
        raise ValueError("a slope needs points at two different x values or more")
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


@dataclass
class Series:
    """Samples of one process (``pid`` set) or gauge: (seconds since sampling began, bytes)."""

    role: str
    pid: int | None
    points: list[tuple[float, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.role if self.pid is None else f"{self.role} (pid {self.pid})"

    def at_or_after(self, seconds: float) -> tuple[float, int] | None:
        """The first sample taken at ``seconds`` or later."""
        return next((point for point in self.points if point[0] >= seconds), None)

    def slope_mib_per_min(self, after_s: float) -> float | None:
        """Least-squares slope of the samples from ``after_s`` on; None with fewer than 3."""
        late = [(t / 60.0, value / MIB) for t, value in self.points if t >= after_s]
        return least_squares_slope(late) if len(late) >= 3 else None

    def summary(self, warmup_s: float) -> dict[str, float | int | str | None]:
        values = [value for _, value in self.points]
        warm = self.at_or_after(warmup_s)
        return {
            "role": self.role,
            "pid": self.pid,
            "samples": len(values),
            "start_mib": values[0] / MIB,
            "warm_mib": None if warm is None else warm[1] / MIB,
            "end_mib": values[-1] / MIB,
            "max_mib": max(values) / MIB,
            "slope_mib_per_min": self.slope_mib_per_min(warmup_s),
        }


class RssSampler:
    """Samples the RSS of the stack under ``root_pid`` and each gauge every ``interval_s``.

    Processes are looked up again at every sample, so a replica that Serve replaces shows
    up as a new series instead of breaking the old one.
    """

    def __init__(
        self, root_pid: int, interval_s: float, gauges: Mapping[str, Callable[[], int]] | None = None
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._root_pid = root_pid
        self._interval_s = interval_s
        self._gauges = dict(gauges or {})
        self._series: dict[tuple[str, int | None], Series] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._began = time.monotonic()

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._began = time.monotonic()
        self.sample_once()
        self._thread.start()

    def stop(self) -> None:
        """Stop, after one last sample so that the series end at the moment of the call."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample_once()

    def elapsed_s(self) -> float:
        return time.monotonic() - self._began

    def sample_once(self) -> None:
        now = self.elapsed_s()
        readings: list[tuple[str, int | None, int]] = []
        for pid, role in stack_processes(self._root_pid).items():
            rss = rss_bytes(pid)
            if rss is not None:
                readings.append((role, pid, rss))
        for name, read in self._gauges.items():
            try:
                readings.append((name, None, read()))
            except Exception:  # a gauge whose source is briefly unreachable skips one sample
                continue
        with self._lock:
            for name, owner, value in readings:
                self._series.setdefault((name, owner), Series(name, owner)).points.append((now, value))

    def series(self) -> list[Series]:
        """A copy of every series, by role then pid."""
        with self._lock:
            copies = [Series(s.role, s.pid, list(s.points)) for s in self._series.values()]
        return sorted(copies, key=lambda s: (s.role, s.pid or 0))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample_once()
