"""Issue 11: fault tests against the real agent process and a real Mosquitto.

Each test provokes one of the issue's probes (a flood of local socket clients, a handler
that fails once, a corrupt journal, a replayed controller confirmation) and asserts the
agent keeps serving deploys with the right outcome.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.control import ControlClient, ControlError, socket_path
from tests.helpers import Fleet, wait_for


def online(fleet: Fleet, host: str) -> None:
    wait_for(lambda: fleet.fleetctl_json("status", host)[1][0]["online"] is True,
             timeout=60, what=f"{host} online")


def agent_log(fleet: Fleet, host: str) -> str:
    return (fleet.root / "agents" / f"{host}.log").read_text(errors="replace")


@contextlib.contextmanager
def many_descriptors(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.fail(f"the test needs {n} descriptors; raise the hard limit (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect_idle(path: Path, n: int, wait: float = 1.0) -> list[socket.socket]:
    """`n` connections that never send anything (each waits up to `wait` for room in the
    listen backlog; the ones that find none are given up)."""
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking AF_UNIX connect waits for backlog room up to SO_SNDTIMEO (a Python
        # timeout would make it non-blocking: EAGAIN at once).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                     struct.pack("ll", int(wait), int(wait % 1 * 1e6)))
        try:
            s.connect(str(path))
        except OSError:
            s.close()
            continue
        conns.append(s)
    return conns


def status_within(path: Path, timeout: float) -> float:
    """Seconds until the control socket answers a status request."""
    start = time.monotonic()

    def ok() -> bool:
        try:
            return ControlClient(path, timeout=2).status().host != ""
        except ControlError:
            return False

    wait_for(ok, timeout=timeout, interval=0.05, what="the control socket to answer")
    return time.monotonic() - start


def test_1100_idle_control_clients_do_not_stop_deploys(make_fleet: Any) -> None:
    """Issue 11 item 6: 1,100 idle connections (systemd's soft limit is 1024 descriptors)
    gave `OSError: [Errno 24]` in the desired handler, a timed-out deploy and ~293,000
    tracebacks. Now the flood costs at most MAX_CLIENTS descriptors, a deploy succeeds
    during it, and running out of descriptors is logged once."""
    fleet = make_fleet({"h1": ["x"]})
    agent = fleet.start_agent("h1")
    online(fleet, "h1")
    path = socket_path(fleet.state_dir("h1"))
    _, agent_hard = resource.prlimit(agent.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (1024, agent_hard))
    with many_descriptors(4096):
        conns = connect_idle(path, 1100)
        try:
            recovered = status_within(path, 60)
            start = time.monotonic()
            rc, out = fleet.fleetctl_json("deploy", "h1", "--system", "/sys/flood-1")
            deployed = time.monotonic() - start
            assert rc == 0 and out["hosts"]["h1"] == "succeeded", out
            held = len(os.listdir(f"/proc/{agent.pid}/fd"))
            print(f"1,100 idle clients ({len(conns)} connected): status after "
                  f"{recovered:.2f}s, deploy succeeded in {deployed:.1f}s, agent holds "
                  f"{held} descriptors")
            assert held < 200

            # Out of descriptors: accepting pauses, logged once, and resumes.
            resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (held, agent_hard))
            more = connect_idle(path, 40, wait=0.1)
            wait_for(lambda: "cannot accept local clients" in agent_log(fleet, "h1"),
                     timeout=30, what="the exhaustion warning")
            with pytest.raises(ControlError, match="did not answer"):
                ControlClient(path, timeout=2).status()  # while it lasts: a clear error
            resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (1024, agent_hard))
            after = status_within(path, 60)
            print(f"descriptors exhausted then freed: status answered {after:.2f}s later")
            for s in more:
                s.close()
        finally:
            for s in conns:
                s.close()
    rc, out = fleet.fleetctl_json("deploy", "h1", "--system", "/sys/flood-2")
    assert rc == 0 and out["hosts"]["h1"] == "succeeded", out
    log = agent_log(fleet, "h1")
    assert log.count("cannot accept local clients") == 1
    assert log.count("accepting local clients again") == 1
    assert "Traceback" not in log
    assert agent.poll() is None
