"""Shared fixtures: a real Mosquitto from the repo's mosquitto.conf, keys, agents.

The broker is the Debian `mosquitto` binary when installed; otherwise testcontainers
(if Docker runs); otherwise the fixture FAILS with the command to install it. It never
skips silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.mqtt.broker import (
    NATS_INSTALL,
    Mosquitto,
    NatsCluster,
    mosquitto_binary,
    nats_binary,
)
from controller.state.keys import init_keys, load_key
from protocol.signing import load_public_keys
from tests.fakeroot import FakeRoot

REPO = Path(__file__).resolve().parents[1]


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class ContainerBroker:
    """Fallback when no mosquitto binary exists: the same config in a container."""

    def __init__(self, workdir: Path) -> None:
        from testcontainers.core.container import DockerContainer  # type: ignore[import-not-found]

        self.workdir = workdir
        conf = (REPO / "mosquitto.conf").read_text()
        from controller.mqtt.broker import render_config
        rendered = render_config(conf, 1883, Path("/mosquitto/data"))
        (workdir / "mosquitto.conf").write_text(
            rendered.replace("listener 1883 127.0.0.1", "listener 1883"))
        self.container = DockerContainer("eclipse-mosquitto:2.0.11").with_exposed_ports(1883)
        self.container.with_volume_mapping(str(workdir / "mosquitto.conf"),
                                           "/mosquitto/config/mosquitto.conf")
        self.container.start()
        self.port = int(self.container.get_exposed_port(1883))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test (own port, own persistence dir)."""
    if mosquitto_binary() is None:
        if _docker_runs():
            cb = ContainerBroker(tmp_path)
            try:
                yield cb  # type: ignore[misc]
            finally:
                cb.stop()
            return
        pytest.fail("mosquitto is not installed and Docker does not run: "
                    "install it with 'sudo apt-get install mosquitto' (make test does this)")
    b = Mosquitto(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _nats(workdir: Path, size: int) -> Iterator[NatsCluster]:
    if nats_binary() is None:
        pytest.fail(f"nats-server is not installed: install it with '{NATS_INSTALL}' "
                    "(make test does this)")
    cluster = NatsCluster(workdir, size)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def nats_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One JetStream-enabled NATS node serving MQTT 3.1.1 (per module: it is shared)."""
    yield from _nats(tmp_path_factory.mktemp("nats1"), 1)


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A 3-node NATS cluster on loopback (routes between the nodes, JetStream streams
    replicated 3 times), started once per module: it takes several seconds."""
    yield from _nats(tmp_path_factory.mktemp("nats3"), 3)


@pytest.fixture
def controller_dir(tmp_path: Path) -> Path:
    d = tmp_path / "controller"
    init_keys(d)
    return d


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix per test, so retained messages never leak between tests."""
    return f"test-{uuid.uuid4().hex[:8]}/v1"


@pytest.fixture
def signing_key(controller_dir: Path):  # type: ignore[no-untyped-def]
    return load_key(controller_dir)


@pytest.fixture
def trusted(controller_dir: Path):  # type: ignore[no-untyped-def]
    return load_public_keys(controller_dir / "controller.pub")


def write_inventory(path: Path, hosts: dict[str, list[str]],
                    groups: dict[str, list[str]] | None = None, extra: str = "") -> Path:
    from controller.state.inventory import render_inventory
    path.write_text(render_inventory(hosts, groups or {}) + extra)
    return path


def fleetctl(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `fleetctl` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          input=input)


class AgentProcess:
    """A real `fleet-agent` process (so tests can SIGKILL and restart it)."""

    def __init__(self, host: str, broker_url: str, state_dir: Path, trust: Path, prefix: str,
                 *extra: str) -> None:
        self.argv = [sys.executable, "-m", "client", "run", "--host", host, "--broker",
                     broker_url, "--state-dir", str(state_dir), "--trust-key", str(trust),
                     "--topic-prefix", prefix, *extra]
        self.log = state_dir.parent / f"{host}-agent.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))  # noqa: SIM115
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.stop()


@contextlib.asynccontextmanager
async def running_agents(agent_list: list) -> AsyncIterator[list]:  # type: ignore[type-arg]
    """Run in-process Agent objects for the duration of the block."""
    tasks = [asyncio.create_task(a.run()) for a in agent_list]
    try:
        yield agent_list
    finally:
        for a in agent_list:
            await a.close()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


@pytest.fixture
def make_fleet(tmp_path: Path, broker: Mosquitto, controller_dir: Path, prefix: str):  # type: ignore[no-untyped-def]
    """Factory: make_fleet({"web1": ["web"], ...}) -> Fleet with an inventory written."""
    from tests.helpers import Fleet

    fleets: list[Fleet] = []

    def make(hosts: dict[str, list[str]], groups: dict[str, list[str]] | None = None,
             extra: str = "") -> Fleet:
        fleet = Fleet(tmp_path, broker.url, prefix, controller_dir, hosts)
        write_inventory(fleet.inventory, hosts, groups, extra)
        fleets.append(fleet)
        return fleet

    yield make
    for f in fleets:
        f.stop()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRoot:
    """A fake NixOS host (tests/fakeroot.py) whose fake commands are first on PATH."""
    fr = FakeRoot(tmp_path)
    for key, value in fr.env().items():
        monkeypatch.setenv(key, value)
    return fr
