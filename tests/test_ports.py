"""free_loopback_port never hands out a port that a server binding [::] would find taken."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from services import ports


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def one_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The range holds a single port, free right now."""
    port = ports.free_loopback_port()
    monkeypatch.setattr(ports, "PICKED_PORTS", range(port, port + 1))
    yield port


def test_a_free_port_is_handed_out(one_port: int) -> None:
    assert ports.free_loopback_port() == one_port


def test_a_port_held_on_ipv4_loopback_is_refused(one_port: int) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", one_port))
        holder.listen()
        with pytest.raises(OSError, match="no free port"):
            ports.free_loopback_port()


@pytest.mark.skipif(not _ipv6_available(), reason="this host has no IPv6 loopback to hold a port on")
def test_a_port_held_by_an_ipv6_only_listener_is_refused(one_port: int) -> None:
    # The ingress binds [::] (both families); an IPv6-only listener on the port makes that bind
    # fail while an IPv4 probe of 127.0.0.1 still succeeds.
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        holder.bind(("::", one_port))
        holder.listen()
        with pytest.raises(OSError, match="no free port"):
            ports.free_loopback_port()
