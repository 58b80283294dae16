"""`tokenline serve` stops like a service: SIGTERM (what systemd, Docker and Kubernetes
send) leaves none of the processes it started running — its private redis-server,
Ray's gcs_server, raylet, agents and workers. Before that, it says where its metrics are."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.serving_stack import free_port

READY_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 120.0
# Ray's processes notice their parent's end on their own schedule; give them this long.
LINGER_S = 30.0
STARTED_PROCESSES = ("redis-server", "gcs_server", "raylet")


@dataclass(frozen=True)
class Process:
    pid: int
    parent: int = field(compare=False)  # changes when an orphan is re-parented
    session: int = field(compare=False)
    start_ticks: int  # since boot: tells a process from a later one that got its pid
    name: str = field(compare=False)


def _processes() -> dict[int, Process]:
    found: dict[int, Process] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        found[pid] = Process(pid, int(fields[1]), int(fields[3]), int(fields[19]), name)
    return found


def _started_by(root: int) -> set[Process]:
    """Every live descendant of ``root`` plus every process in its session (Ray may re-parent)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for process in table.values():
        children.setdefault(process.parent, []).append(process.pid)
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return {process for process in table.values() if process.pid in tree or process.session == root}


def _alive(processes: set[Process]) -> set[Process]:
    table = _processes()
    return {p for p in processes if p.pid in table and table[p.pid].start_ticks == p.start_ticks}


def _read_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def test_sigterm_stops_every_process_serve_started(demo_model_dir: Path) -> None:
    metrics_port = free_port()
    command = [
        sys.executable, "-m", "services.cli", "serve",
        "--model", str(demo_model_dir), "--model-name", "demo",
        "--no-auth", "--grpc-port", str(free_port()), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    # A session of its own: every process it starts can be found, and none of ours is hit.
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(server.stdout, lines), daemon=True).start()
    started: set[Process] = set()
    output: list[str] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not any(line.startswith("logs: ") for line in output):
            assert server.poll() is None, f"serve exited with {server.returncode}:\n{''.join(output[-40:])}"
            assert time.monotonic() < deadline, "serve printed no ready, metrics and logs lines"
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=1.0))
        ready = next(i for i, line in enumerate(output) if line.startswith("ready: grpc://"))
        assert output[ready + 1].startswith("metrics: http://"), "the metrics line follows the ready line"
        url = output[ready + 1].removeprefix("metrics: ").strip()
        assert url.endswith(f":{metrics_port}/metrics"), url
        with urllib.request.urlopen(url, timeout=10) as scrape:  # Ray's metrics agent answers there
            assert scrape.status == 200
        logs = Path(output[ready + 2].removeprefix("logs: ").strip())
        # Replica log lines go to Serve's files only (SERVE_LOG_ENV): the line names where.
        assert any(logs.glob("replica_*.log")), f"no replica log files in {logs}"
        copied = [line for line in output if "(ServeReplica:" in line]
        assert not copied, f"replica log lines also reached serve's output: {copied[:3]}"
        started = _started_by(server.pid)
        names = {process.name for process in started}
        for name in STARTED_PROCESSES:  # the test must see what it checks
            assert name in names, f"no {name} among the processes serve started: {sorted(names)}"

        server.send_signal(signal.SIGTERM)
        returncode = server.wait(timeout=EXIT_TIMEOUT_S)
        started |= _started_by(server.pid)  # whatever started after the first look
        deadline = time.monotonic() + LINGER_S
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(started)
        assert not left, f"left running after SIGTERM: {sorted((p.name, p.pid) for p in left)}"
        assert returncode == 0, f"serve exited with {returncode} on SIGTERM:\n{''.join(output[-20:])}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for process in _alive(started):  # clean up after a failure: only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
