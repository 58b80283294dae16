"""Loopback ports that stay free until the process that asked for one binds it."""

from __future__ import annotations

import random
import socket

# Below Linux's default ephemeral range (32768-60999), from which every outgoing connection
# takes its source port and port 0 is drawn, and above Ray's worker ports (10002-19999). A
# port drawn by binding port 0 was once taken by another process in the moment between the
# check and the bind of the server it was meant for; one from this range is not handed out
# by the kernel, so only another caller of this function could take it.
PICKED_PORTS = range(20000, 32000)
_ATTEMPTS = 200


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, drawn at random from ``PICKED_PORTS``."""
    chooser = random.SystemRandom()
    for _ in range(_ATTEMPTS):
        port = chooser.choice(PICKED_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    span = f"{PICKED_PORTS.start}-{PICKED_PORTS.stop - 1}"
    raise OSError(f"no free port on {host} in {span} after {_ATTEMPTS} tries")
