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


def _bindable(family: socket.AddressFamily, address: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as [::] servers bind
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _free_everywhere(port: int) -> bool:
    """Whether a server binding every address could take ``port``: the ingress binds [::]
    (IPv4 and IPv6), which fails on a port any socket of either family holds, an IPv6-only
    listener included — one that a probe of an IPv4 address alone does not see."""
    try:
        return _bindable(socket.AF_INET6, "::", port)
    except OSError:  # no IPv6 on this host: the IPv4 wildcard is every address there is
        return _bindable(socket.AF_INET, "0.0.0.0", port)


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` and on every other address now, drawn at random from ``PICKED_PORTS``."""
    chooser = random.SystemRandom()
    for _ in range(_ATTEMPTS):
        port = chooser.choice(PICKED_PORTS)
        if _bindable(socket.AF_INET, host, port) and _free_everywhere(port):
            return port
    span = f"{PICKED_PORTS.start}-{PICKED_PORTS.stop - 1}"
    raise OSError(f"no free port on {host} in {span} after {_ATTEMPTS} tries")
