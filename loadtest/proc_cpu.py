"""CPU seconds per process, from /proc (Linux): what each process of the stack spent.

``process_tree`` lists a process and its descendants (``rss`` uses it too); ``cpu_by_process``
snapshots their CPU; ``cpu_delta`` turns two snapshots into CPU seconds per process title, so
a run's CPU can be split into client, proxy, replicas, Redis.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any


def process_label(cmdline: Sequence[str]) -> str:
    """A short name for a process: Ray's title for Ray workers, else the program (and the
    Python script or module it runs)."""
    first = cmdline[0].strip() if cmdline else ""
    if not first:
        return "?"
    if first.startswith("ray::"):  # Ray appends ".method" while an actor runs a task; drop it
        return re.sub(r"\.[A-Za-z_]\w*$", "", first.split()[0])
    program = os.path.basename(first.split()[0])
    if program.startswith("python"):
        for index, arg in enumerate(cmdline[1:], start=1):
            if arg == "-m" and index + 1 < len(cmdline):
                return f"python -m {cmdline[index + 1]}"
            if arg.endswith(".py"):
                return f"python {os.path.basename(arg)}"
    return program


def process_tree(root_pid: int) -> dict[int, tuple[float, list[str]]]:
    """pid -> (CPU seconds, command line) for ``root_pid`` and all its descendants; {} off Linux.

    Walking down from one root keeps other users' processes out: on a shared machine another
    test run's Ray stack carries the same process titles as ours."""
    if not os.path.isdir("/proc"):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float, list[str]]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                stat = stat_file.read()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd_file:
                raw = cmd_file.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, cmdline)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, tuple[float, list[str]]] = {}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            _, cpu, cmdline = table[pid]
            found[pid] = (cpu, cmdline)
            todo.extend(children.get(pid, []))
    return found


def cpu_by_process(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds) for ``root_pid`` and all its descendants; {} off Linux."""
    return {
        pid: ("this process (benchmark client)" if pid == root_pid else process_label(cmdline), cpu)
        for pid, (cpu, cmdline) in process_tree(root_pid).items()
    }


CpuSnapshot = Mapping[int, tuple[str, float]]


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot, tokens: int, wall_s: float) -> dict[str, Any]:
    """CPU seconds spent between two snapshots, summed by label, largest first."""
    by_label: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        by_label[label] = by_label.get(label, 0.0) + cpu - before.get(pid, (label, 0.0))[1]
    ranked = sorted(by_label.items(), key=lambda item: -item[1])
    return {
        "wall_s": wall_s,
        "output_tokens": tokens,
        "total_cpu_s": sum(by_label.values()),
        "how": "utime+stime of this process and its descendants from /proc/<pid>/stat, "
        "before and after the run, summed by process title",
        "processes": {
            label: {"cpu_s": cpu, "cpu_ms_per_token": 1e3 * cpu / tokens if tokens else 0.0}
            for label, cpu in ranked
            if cpu >= 0.005
        },
    }
