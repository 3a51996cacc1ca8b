"""Test helpers: an MQTT listener client, polling, and a Fleet of real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from protocol.broker import BrokerCluster
from protocol.codec import decode
from protocol.models import EVENT_TYPES, Event
from protocol.mqtt import MqttVersion, random_client_id


def mqtt_client(broker_url: str, version: MqttVersion = "5", node: int = 0,
                **extra: Any) -> aiomqtt.Client:
    """A plain test client on node `node` of `broker_url` (one URL or a cluster's list),
    built like every Flotilla client (protocol.mqtt)."""
    broker = BrokerCluster.parse(broker_url, version)
    return aiomqtt.Client(**broker.client_kwargs(broker.addresses[node],
                                                 random_client_id("test")), **extra)


@dataclass
class Fleet:
    """A test fleet: broker, controller state dir, inventory, agents as real processes."""

    root: Path
    broker_url: str
    prefix: str
    controller_dir: Path
    hosts: dict[str, list[str]]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mqtt_version: MqttVersion = "5"
    agent_broker_url: str | None = None  # agents' --broker, when not the controller's
    controller_auth: tuple[str, Path] | None = None  # fleetctl's username, password file

    @property
    def inventory(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def trust(self) -> Path:
        return self.controller_dir / "controller.pub"

    def env(self) -> dict[str, str]:
        auth = {} if self.controller_auth is None else {
            "FLEET_USERNAME": self.controller_auth[0],
            "FLEET_PASSWORD_FILE": str(self.controller_auth[1])}
        return {**os.environ, "FLEET_BROKER": self.broker_url,
                "FLEET_MQTT_VERSION": self.mqtt_version,
                "FLEET_INVENTORY": str(self.inventory),
                "FLEET_STATE_DIR": str(self.controller_dir), "FLEET_TOPIC_PREFIX": self.prefix,
                **auth}

    def fleetctl(self, *args: str, timeout: float = 90, input: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env(), input=input)

    def fleetctl_json(self, *args: str, timeout: float = 90) -> tuple[int, Any]:
        r = self.fleetctl(*args, "--json", timeout=timeout)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        assert lines, f"no JSON output (rc={r.returncode}): {r.stderr}"
        return r.returncode, json.loads(lines[-1])

    def agent_argv(self, host: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "client", "run", "--host", host,
                "--broker", self.agent_broker_url or self.broker_url,
                "--mqtt-version", self.mqtt_version, "--state-dir", str(self.state_dir(host)),
                "--trust-key", str(self.trust), "--topic-prefix", self.prefix, *extra]

    def state_dir(self, host: str) -> Path:
        return self.root / "agents" / host

    def start_agent(self, host: str, *extra: str, env: dict[str, str] | None = None
                    ) -> subprocess.Popen[bytes]:
        self.state_dir(host).mkdir(parents=True, exist_ok=True)
        log = open(self.root / "agents" / f"{host}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(self.agent_argv(host, *extra), stdout=log, stderr=log,
                                env=env)
        self.procs.append(proc)
        return proc

    def start_simulated(self, hosts: list[str], *extra: str) -> subprocess.Popen[bytes]:
        (self.root / "agents").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "agents" / "simulate.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "client", "simulate", "--hosts", ",".join(hosts),
             "--broker", self.agent_broker_url or self.broker_url,
             "--mqtt-version", self.mqtt_version, "--state-dir", str(self.root / "agents"),
             "--trust-key", str(self.trust), "--topic-prefix", self.prefix, *extra],
            stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def journal(self, host: str) -> list[dict[str, Any]]:
        path = self.state_dir(host) / "journal.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.2,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Listener:
    """A plain MQTT client collecting decoded events from a topic filter."""

    def __init__(self, broker_url: str, topic: str, version: MqttVersion = "5",
                 node: int = 0) -> None:
        self.broker_url, self.version, self.node = broker_url, version, node
        self.topic = topic
        self.events: list[Event] = []
        self.raw: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Listener:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _run(self) -> None:
        async with mqtt_client(self.broker_url, self.version, self.node) as client:
            await client.subscribe(self.topic, qos=1)
            self._ready.set()
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                self.raw.append((str(m.topic), payload))
                try:
                    self.events.append(decode(payload, expect=EVENT_TYPES))
                except Exception:
                    pass

    async def wait(self, predicate: Callable[[Event], bool], timeout: float = 20) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events:
                if predicate(ev):
                    return ev
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching event in {timeout}s; saw {self.events[-5:]}")


async def publish(broker_url: str, topic: str, payload: bytes, retain: bool = False,
                  version: MqttVersion = "5", node: int = 0) -> None:
    async with mqtt_client(broker_url, version, node) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


def deploy_bg(fleet: Fleet, *args: str) -> subprocess.Popen[str]:
    """`fleetctl deploy ... --json` in the background (to answer prompts meanwhile)."""
    return subprocess.Popen([sys.executable, "-m", "controller", "deploy", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=fleet.env())


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, dict[str, Any]]:
    """Exit code and the last JSON line of a background fleetctl command."""
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, err
    return proc.returncode, json.loads(lines[-1])


def wait_online(fleet: Fleet, hosts: list[str], timeout: float = 30) -> None:
    """Until `fleetctl status` shows every one of `hosts` online (its agent connected and
    subscribed: it publishes `online` after subscribing)."""
    def online() -> bool:
        _, rows = fleet.fleetctl_json("status")
        up = {r["host"] for r in rows if r["online"]}
        return up.issuperset(hosts)
    wait_for(online, timeout=timeout, what=f"{len(hosts)} agent(s) online")


def wait_prompt(fleet: Fleet, host: str, kind: str | None = None, timeout: float = 30
                ) -> dict[str, Any]:
    """The open prompt of `host` (of `kind`), as `fleetctl prompts --json` lists it."""
    def found() -> dict[str, Any] | None:
        _, rows = fleet.fleetctl_json("prompts", host)
        return next((r for r in rows if kind is None or r["kind"] == kind), None)
    result: dict[str, Any] = wait_for(found, timeout=timeout, what=f"a prompt on {host}")
    return result
