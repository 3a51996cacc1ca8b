"""Ports for the brokers and servers the tests start (controller.mqtt.broker.free_port).

A port from `bind(0)` lies in the kernel's ephemeral range, which is also where the
local ports of outgoing connections come from: an agent connecting between the choice
and the broker's bind took the port ("Address already in use", seen in a full run)."""

from __future__ import annotations

import socket
from pathlib import Path

from controller.mqtt.broker import free_port


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_ports_are_outside_the_range_outgoing_connections_use_and_never_repeat() -> None:
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if low <= p <= high]
    assert len(set(ports)) == len(ports)


def test_a_port_handed_out_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.getpeername()[1] == port
