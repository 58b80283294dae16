"""A stopping ingress replica keeps its port open until another replica listens on it.

With ``grpc_ingress: replica`` the port clients dial is shared (SO_REUSEPORT) by the
ingress replicas of a node. When Serve replaces the only one (a rolling update), it
starts the new replica while the old one drains; if the old one closed its listener at
once, connections in between would be refused. So it goes on accepting calls until a
listener of another process is on the port (Linux: the kernel's socket table), or the
handover time is up; when the application is being deleted there is nothing to wait for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
LISTEN = "0A"  # the kernel's code for a socket in state LISTEN
POLL_S = 0.25


def listening_socket_inodes(port: int) -> set[int]:
    """Inodes of every socket listening on ``port`` in this network namespace."""
    inodes: set[int] = set()
    for table in TCP_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6, or not Linux: nothing to learn here
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def own_socket_inodes() -> set[int]:
    """Inodes of the sockets this process holds open."""
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{os.getpid()}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            link = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed since the listing
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def another_listener(port: int) -> bool:
    return bool(listening_socket_inodes(port) - own_socket_inodes())


async def wait_for_another_listener(port: int, timeout_s: float) -> bool:
    """True once another process listens on ``port``; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if another_listener(port):
            return True
        if time.monotonic() >= deadline:
            logger.warning("no other ingress listener appeared; closing the port", extra={"port": port})
            return False
        await asyncio.sleep(POLL_S)
