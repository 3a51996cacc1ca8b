"""Issue 13 end to end: the same deploys against Mosquitto (MQTT 5 and MQTT 3.1.1) and a
3-node NATS cluster (MQTT 3.1.1 gateway on JetStream), plus the refusals and capability
checks that used to fail silently or retry for ever.

On the NATS cluster the agents list node A first, the controller node B, and a second
controller (`rollout resume`, `status`) node C: every message crosses the cluster.
This is a focused subset (deploy, catch-up, agent SIGKILL, controller SIGKILL + resume,
deploy while a node is down, node restart mid-rollout), not the whole suite three times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from controller.mqtt.broker import (
    NATS_INSTALL,
    Mosquitto,
    NatsCluster,
    NatsNode,
    NatsNodeConfig,
    find_config,
    free_port,
    mqtt_connack,
    nats_binary,
    render_nats_config,
)
from controller.mqtt.connection import read_retained
from controller.rollout.driver import ControllerContext, DeployRequest, RolloutDriver
from controller.state.eventlog import EventLog
from controller.state.keys import load_key
from protocol.broker import BrokerCluster
from protocol.mqtt import MqttVersion
from protocol.topics import Topics
from tests.conftest import write_inventory
from tests.helpers import (
    Fleet,
    deploy_bg,
    finish,
    mqtt_client,
    wait_for,
    wait_online,
    wait_prompt,
)

SYSTEM = "/nix/store/dddd-nixos-system-cluster-25.11"


@dataclass
class Target:
    """One broker set-up: the URLs the agents, the controller and a second controller use,
    and how to restart "the broker" mid-rollout (Mosquitto: kill -9 and start again on
    the same port and data; NATS: restart node A, the agents' node, with SIGTERM: a
    killed node costs seconds of JetStream leader elections, see the README)."""

    name: str
    version: MqttVersion
    agent_url: str
    controller_url: str
    other_url: str
    restart: Callable[[], None]
    down: Callable[[], contextlib.AbstractContextManager[None]]
    root: Path
    controller_dir: Path
    prefix: str
    fleets: list[Fleet] = field(default_factory=list)

    def fleet(self, hosts: dict[str, list[str]]) -> Fleet:
        f = Fleet(self.root, self.controller_url, self.prefix, self.controller_dir, hosts,
                  mqtt_version=self.version, agent_broker_url=self.agent_url)
        write_inventory(f.inventory, hosts)
        self.fleets.append(f)
        return f


@contextlib.contextmanager
def mosquitto_down(broker: Mosquitto) -> Iterator[None]:
    broker.stop()
    try:
        yield
    finally:
        broker.start()


@contextlib.contextmanager
def node_down(cluster: NatsCluster, index: int) -> Iterator[None]:
    cluster.nodes[index].stop()
    try:
        yield
    finally:
        cluster.nodes[index].start()


def _mosquitto_restart(broker: Mosquitto) -> None:
    broker.kill()
    broker.start()


# Mosquitto with MQTT 5 runs the same scenarios in test_deploy_e2e, test_rollout_e2e and
# test_reliability; here only what is new for it (a deploy started while it is down).
ALL = ["mosquitto-5", "mosquitto-3.1.1", "nats-cluster"]
CROSS = pytest.mark.parametrize("target", ALL[1:], indirect=True)


@pytest.fixture(params=ALL)
def target(request: pytest.FixtureRequest, tmp_path: Path, controller_dir: Path,
           prefix: str) -> Iterator[Target]:
    if request.param.startswith("mosquitto"):
        broker: Mosquitto = request.getfixturevalue("broker")
        version: MqttVersion = "5" if request.param.endswith("-5") else "3.1.1"
        t = Target(request.param, version, broker.url, broker.url, broker.url,
                   lambda: _mosquitto_restart(broker), lambda: mosquitto_down(broker),
                   tmp_path, controller_dir, prefix)
    else:
        cluster: NatsCluster = request.getfixturevalue("nats_cluster")
        a, b, c = (n.url for n in cluster.nodes)
        t = Target(request.param, "3.1.1", f"{a},{b},{c}", f"{b},{c},{a}", f"{c},{a},{b}",
                   lambda: cluster.restart(0), lambda: node_down(cluster, 1),
                   tmp_path, controller_dir, prefix)
    yield t
    for f in t.fleets:
        f.stop()


def accepts(fleet: Fleet, host: str) -> list[tuple[str, int]]:
    return [(r["deployment_id"], r["generation"]) for r in fleet.journal(host)
            if r["kind"] == "accept"]


def status_via(fleet: Fleet, url: str, host: str) -> dict[str, Any]:
    saved, fleet.broker_url = fleet.broker_url, url
    try:
        rc, rows = fleet.fleetctl_json("status", host)
    finally:
        fleet.broker_url = saved
    assert rc == 0, rows
    return dict(rows[0])


@CROSS
def test_deploy_then_a_late_host_catches_up_through_another_node(target: Target) -> None:
    fleet = target.fleet({"on1": ["on"], "on2": ["on"], "late": ["late"]})
    fleet.start_simulated(["on1", "on2"])
    rc, out = fleet.fleetctl_json("deploy", "@on", "--system", SYSTEM, "--timeout", "60")
    assert rc == 0 and out["hosts"] == {"on1": "succeeded", "on2": "succeeded"}, out
    assert out["succeeded"] == 2 and accepts(fleet, "on1") == [(out["rollout"], 1)]
    # the late host is offline: its retained desired state waits for it (published
    # through the controller's node, read later through the agents' node)
    rc, out = fleet.fleetctl_json("deploy", "late", "--system", SYSTEM, "--no-wait")
    assert rc == 0, out
    fleet.start_agent("late")

    def result() -> list[str]:
        try:
            return [r["status"] for r in fleet.journal("late") if r["kind"] == "result"]
        except (FileNotFoundError, ValueError):
            return []

    assert wait_for(result, timeout=40, what="the late host to catch up") == ["succeeded"]
    row = wait_for(lambda: (r := status_via(fleet, target.other_url, "late"))["result"]
                   == "succeeded" and r, timeout=20, what="its state through another node")
    assert row["online"] is True and row["system"] == SYSTEM and row["generation"] == 1
    assert accepts(fleet, "late") == [(out["rollout"], 1)]


@CROSS
def test_agent_sigkilled_mid_deploy_resumes_without_rerunning(target: Target) -> None:
    fleet = target.fleet({"solo": ["x"]})
    agent = fleet.start_agent("solo", "--sim-switch-delay", "1.5")
    proc = deploy_bg(fleet, "solo", "--system", SYSTEM, "--timeout", "60")
    wait_for(lambda: any(r["kind"] == "begin" and r.get("stage") == "switch"
                         for r in fleet.journal("solo")) if fleet.state_dir("solo").joinpath(
        "journal.jsonl").exists() else False, timeout=40, interval=0.05, what="the switch")
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    fleet.start_agent("solo")
    rc, out = finish(proc, timeout=60)
    assert rc == 0 and out["hosts"] == {"solo": "succeeded"}, out
    journal = fleet.journal("solo")
    assert accepts(fleet, "solo") == [(out["rollout"], 1)]
    fetched = [r for r in journal if r["kind"] == "end" and r.get("stage") == "fetch"]
    assert len(fetched) == 1  # the fetch done before the kill is not run again
    assert [r["status"] for r in journal if r["kind"] == "result"] == ["succeeded"]


@CROSS
def test_controller_sigkilled_then_resumed_through_another_node(target: Target) -> None:
    hosts = [f"h{i}" for i in range(6)]
    fleet = target.fleet({h: ["all"] for h in hosts})
    fleet.start_simulated(hosts, "--sim-fetch-delay", "0.4")
    proc = deploy_bg(fleet, "@all", "--system", SYSTEM, "--batch", "3", "--timeout", "90")

    def second_batch_sent() -> dict[str, Any] | None:
        if not (fleet.controller_dir / "state.jsonl").exists():
            return None
        r = next(iter(EventLog(fleet.controller_dir).load().get("rollouts", {}).values()), {})
        if "0" not in r.get("batch_done", {}):
            return None
        return r if any(r["hosts"][h]["status"] == "published" for h in hosts[3:]) else None

    r = wait_for(second_batch_sent, timeout=40, interval=0.05, what="batch 2 to start")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    fleet.broker_url = target.other_url  # a controller on another node takes over
    rc, out = fleet.fleetctl_json("rollout", "resume", r["id"], timeout=90)
    assert rc == 0 and out["status"] == "succeeded" and out["succeeded"] == 6, out
    for h in hosts:
        assert accepts(fleet, h) == [(r["id"], 1)], h


def test_deploy_through_a_node_outage_and_a_restart_mid_rollout(target: Target) -> None:
    """The deploy starts while the controller's broker node is down (NATS: the next
    listed node serves it; Mosquitto, one address: it is back within --connect-timeout;
    both used to exit 3), then the agents' node restarts while every host is mid-deploy:
    nothing is lost, nothing runs twice."""
    hosts = [f"n{i}" for i in range(6)]
    fleet = target.fleet({h: ["all"] for h in hosts})
    fleet.start_simulated(hosts, "--sim-fetch-delay", "1.0", "--sim-switch-delay", "1.0")
    with target.down():
        proc = deploy_bg(fleet, "@all", "--system", SYSTEM, "--timeout", "90")
        if target.name.startswith("mosquitto"):
            time.sleep(1.0)  # fleetctl starts while the broker is down (the scenario)

    def all_accepted() -> bool:
        try:
            return all(accepts(fleet, h) for h in hosts)
        except (FileNotFoundError, ValueError):
            return False

    wait_for(all_accepted, timeout=40, interval=0.05, what="every host to accept")
    target.restart()  # mid-deploy: every host is fetching or switching
    rc, out = finish(proc, timeout=90)
    assert rc == 0, out
    assert out["succeeded"] == 6 and set(out["hosts"].values()) == {"succeeded"}
    for h in hosts:
        assert len(accepts(fleet, h)) == 1, h


@CROSS
def test_cancel_and_approve_through_another_node(target: Target) -> None:
    """The operator's commands from another node than the driver's: `cancel` ends the
    wait and withdraws the retained desired state (an empty retained message: none is
    left on the agents' node for a host coming back); `approve` lets the next deploy go
    on."""
    fleet = target.fleet({"c1": ["c"]})
    fleet.start_agent("c1")
    first = deploy_bg(fleet, "c1", "--system", SYSTEM, "--approval", "ask", "--timeout", "60")
    wait_prompt(fleet, "c1", "approval")
    saved, fleet.broker_url = fleet.broker_url, target.other_url
    try:
        r = fleet.fleetctl("cancel", "c1", "--reason", "not today")
        assert r.returncode == 0, r.stdout + r.stderr
        rc, out = finish(first)
        assert rc != 0 and out["hosts"] == {"c1": "cancelled"}, out

        async def retained_desired() -> list[bytes]:
            topics = Topics(fleet.prefix)
            async with mqtt_client(target.agent_url, target.version) as client:
                kept = await read_retained(client, topics, [topics.desired("c1")])
            return [bytes(m.payload) for m in kept if m.payload]  # type: ignore[arg-type]

        assert asyncio.run(retained_desired()) == []
        second = deploy_bg(fleet, "c1", "--system", SYSTEM + "-2", "--approval", "ask",
                           "--timeout", "60")
        wait_prompt(fleet, "c1", "approval")
        r = fleet.fleetctl("approve", "c1")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        fleet.broker_url = saved
    rc, out = finish(second)
    assert rc == 0 and out["hosts"] == {"c1": "succeeded"}, out
    results = [r["status"] for r in fleet.journal("c1") if r["kind"] == "result"]
    assert results == ["cancelled", "succeeded"], results


@pytest.mark.parametrize("target", ["mosquitto-5", "nats-cluster"], indirect=True)
def test_watch_and_logs_follow_outlive_their_node_going_away(target: Target) -> None:
    """`fleetctl watch` and `logs --follow` run for as long as a rollout does; their
    node going away (NATS: the first of the controller's list, while the hosts finish;
    Mosquitto: restarted) used to end both with exit 3. They take the connection up
    again and end with the rollout, the follower having printed every line once."""
    fleet = target.fleet({"w1": ["w"], "w2": ["w"]})
    fleet.start_simulated(["w1", "w2"], "--sim-fetch-delay", "3")
    deploy = deploy_bg(fleet, "@w", "--system", SYSTEM, "--timeout", "90")

    def accepted() -> bool:
        try:
            return all(accepts(fleet, h) for h in ("w1", "w2"))
        except (FileNotFoundError, ValueError):
            return False

    wait_for(accepted, timeout=40, what="both hosts to accept")
    followers = {}
    for name, args in (("watch", ["watch", "--json"]), ("logs", ["logs", "w1", "--follow"])):
        out = fleet.root / f"{name}.out"
        followers[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "controller", *args], stdout=out.open("w"),
            stderr=subprocess.PIPE, text=True, env=fleet.env()))
    for name, (out, proc) in followers.items():
        wait_for(lambda o=out, p=proc: p.poll() is None and o.read_text().strip(), timeout=30,
                 what=f"{name} to print its first line")
    with target.down():
        if target.name == "nats-cluster":  # the hosts finish while the node is away
            wait_for(lambda: all(r["kind"] != "result" or r["status"] == "succeeded"
                                 for h in ("w1", "w2") for r in fleet.journal(h))
                     and all(any(r["kind"] == "result" for r in fleet.journal(h))
                             for h in ("w1", "w2")), timeout=40, what="both hosts to finish")
    rc, summary = finish(deploy, timeout=90)
    assert rc == 0 and summary["succeeded"] == 2, summary
    results = {}
    for name, (out, proc) in followers.items():
        _, err = proc.communicate(timeout=60)
        results[name] = (proc.returncode, out.read_text().splitlines(), err)
    rc, lines, err = results["watch"]
    assert rc == 0 and "Traceback" not in err and "ERROR" not in err, err
    end = json.loads(lines[-1])
    assert end["type"] == "end" and end["status"] == "succeeded", end
    rc, lines, err = results["logs"]
    assert rc == 0 and "Traceback" not in err, err
    stored = fleet.fleetctl("logs", "w1")
    assert stored.returncode == 0 and lines == stored.stdout.splitlines()  # each once


# -- refusals and capabilities (symptoms of the issue) --------------------------------
def one_line(r: subprocess.CompletedProcess[str], code: int, fragment: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


def fleetctl(url: str, version: str, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEET_BROKER": url, "FLEET_MQTT_VERSION": version,
           "FLEET_STATE_DIR": str(tmp / "ctl"), "FLEET_INVENTORY": str(tmp / "fleet.toml")}
    return subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True,
                          text=True, timeout=150, env=env)


def test_mqtt5_refused_by_nats_is_one_line_naming_the_fix(nats_node: NatsCluster,
                                                          tmp_path: Path) -> None:
    write_inventory(tmp_path / "fleet.toml", {"h1": ["x"]})
    started = time.monotonic()
    r = fleetctl(nats_node.url, "5", "status", "--connect-timeout", "120", tmp=tmp_path)
    line = one_line(r, 3, "--mqtt-version 3.1.1")
    assert "unsupported protocol version" in line
    assert time.monotonic() - started < 100  # refused at once, not retried for 120 s
    # and the same broker works in 3.1.1 mode
    r = fleetctl(nats_node.url, "3.1.1", "status", tmp=tmp_path)
    assert r.returncode == 0, r.stderr


def test_every_broker_command_refused_mqtt5_says_the_fix(nats_node: NatsCluster,
                                                         tmp_path: Path) -> None:
    """Not only `status`: every command that talks to the broker (the dashboard's own
    connection too) stops at once with the same line."""
    write_inventory(tmp_path / "fleet.toml", {"h1": ["x"]})
    assert fleetctl(nats_node.url, "5", "keys", "init", tmp=tmp_path).returncode == 0
    for args in (["deploy", "h1", "--system", SYSTEM], ["prompts"], ["approve", "h1"],
                 ["cancel", "h1"], ["rollback", "h1"], ["hosts"],
                 ["serve", "--listen", f"127.0.0.1:{free_port()}"]):
        one_line(fleetctl(nats_node.url, "5", *args, tmp=tmp_path), 3, "--mqtt-version 3.1.1")


@pytest.mark.parametrize("target", ["nats-cluster"], indirect=True)
def test_the_dashboard_connects_to_another_node_when_the_first_is_down(
        target: Target) -> None:
    fleet = target.fleet({"h1": ["web"]})
    fleet.start_simulated(["h1"])
    wait_online(fleet, ["h1"])
    with target.down():  # the first node of the controller's list
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "serve", "--listen",
             f"127.0.0.1:{free_port()}", "--json"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=fleet.env())
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.communicate(timeout=10)[1]
            url = json.loads(line)["url"]

            def h1_online() -> bool:
                with urllib.request.urlopen(url + "api/hosts", timeout=10) as r:
                    return any(row["host"] == "h1" and row["online"]
                               for row in json.loads(r.read()))
            wait_for(h1_online, timeout=30, what="the dashboard to show h1 online")
        finally:
            proc.terminate()
            proc.wait(10)


def test_agent_stops_on_a_version_refusal_instead_of_retrying(nats_node: NatsCluster,
                                                              tmp_path: Path,
                                                              controller_dir: Path) -> None:
    argv = [sys.executable, "-m", "client", "run", "--host", "v5", "--broker", nats_node.url,
            "--state-dir", str(tmp_path / "v5"), "--trust-key",
            str(controller_dir / "controller.pub")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90)  # was: for ever
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "--mqtt-version 3.1.1" in last and "Traceback" not in r.stderr, r.stderr


@pytest.fixture
def password_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mosquitto]:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "h1", "right"], check=True)
    conf = find_config().read_text().replace("allow_anonymous true",
                                             f"allow_anonymous false\npassword_file {passwd}")
    (tmp_path / "auth.conf").write_text(conf)
    monkeypatch.setenv("FLEET_MOSQUITTO_CONF", str(tmp_path / "auth.conf"))
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def test_bad_credentials_stop_fleetctl_and_the_agent(password_broker: Mosquitto,
                                                     tmp_path: Path, controller_dir: Path
                                                     ) -> None:
    write_inventory(tmp_path / "fleet.toml", {"h1": ["x"]})
    (tmp_path / "wrong").write_text("wrong\n")
    started = time.monotonic()
    r = fleetctl(password_broker.url, "5", "status", "--username", "h1", "--password-file",
                 str(tmp_path / "wrong"), "--connect-timeout", "120", tmp=tmp_path)
    one_line(r, 3, "refused")
    assert time.monotonic() - started < 100  # refused at once, not retried for 120 s
    r = fleetctl(password_broker.url, "3.1.1", "status", tmp=tmp_path)  # anonymous
    one_line(r, 3, "refused")
    version = "3.1.1"
    r = subprocess.run([sys.executable, "-m", "client", "run", "--host", "h1", "--broker",
                        password_broker.url, "--mqtt-version", version, "--password-file",
                        str(tmp_path / "wrong"), "--state-dir", str(tmp_path / "h1"),
                        "--trust-key", str(controller_dir / "controller.pub")],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 3 and "refused" in r.stderr.strip().splitlines()[-1], r.stderr


def test_share_group_is_refused_in_mqtt311_mode(tmp_path: Path) -> None:
    write_inventory(tmp_path / "fleet.toml", {"h1": ["x"]})
    r = fleetctl("mqtt://127.0.0.1:1", "3.1.1", "deploy", "h1", "--system", SYSTEM,
                 "--share-group", "ctl", tmp=tmp_path)
    one_line(r, 2, "--share-group needs MQTT 5")


@pytest.mark.parametrize("args", [["--topic-prefix", "fleet.v1"], ["--topic-prefix", "my fleet"],
                                  ["--topic-prefix", "$fleet"], ["--topic-prefix", "a//b"],
                                  ["--topic-prefix", "fleet/*"],
                                  ["--mqtt-version", "4.0"]])
def test_prefixes_nats_would_disconnect_and_bad_versions_are_usage_errors(
        args: list[str], tmp_path: Path, controller_dir: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from client.cli import main as agent_main
    from controller.cli import main as fleetctl_main
    write_inventory(tmp_path / "fleet.toml", {"h1": ["x"]})
    monkeypatch.setenv("FLEET_INVENTORY", str(tmp_path / "fleet.toml"))
    runs = [(fleetctl_main, ["status", "--broker", "mqtt://127.0.0.1:1", *args]),
            (agent_main, ["run", "--host", "h1", "--broker", "mqtt://127.0.0.1:1",
                          "--state-dir", str(tmp_path / "h1"), "--trust-key",
                          str(controller_dir / "controller.pub"), *args])]
    for main, argv in runs:
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err, argv
        if main is fleetctl_main:
            assert len(err) == 1, err
        # (fleet-agent's argparse prints its usage above the one error line)
        assert ("topic prefix" if "--topic-prefix" in args else "--mqtt-version") in err[-1]


class ShareBlackhole:
    """A TCP proxy in front of a real Mosquitto that behaves like the NATS gateway does
    with `$share/...`: the SUBSCRIBE is granted, nothing is ever delivered to it (the
    filter is renamed to a topic nobody publishes). Everything else passes unchanged."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ShareBlackhole:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def to_broker() -> None:
            while True:
                head = await reader.readexactly(1)
                raw, length, mult = b"", 0, 1
                while True:
                    b = await reader.readexactly(1)
                    raw += b
                    length += (b[0] & 0x7F) * mult
                    mult *= 128
                    if not b[0] & 0x80:
                        break
                body = await reader.readexactly(length)
                if head[0] >> 4 in (8, 10):  # SUBSCRIBE, UNSUBSCRIBE
                    body = body.replace(b"$share/", b"$xhare/")
                up_writer.write(head + raw + body)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(to_broker(), to_client())
        for w in (writer, up_writer):
            w.close()


async def test_share_group_that_delivers_nothing_falls_back_to_a_plain_subscription(
        make_fleet: Any, broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    hosts = ["s1", "s2", "s3"]
    fleet = make_fleet({h: ["x"] for h in hosts})
    fleet.start_simulated(hosts)
    async with ShareBlackhole(broker.port) as proxy:
        ctx = ControllerContext(broker=BrokerCluster.parse(f"mqtt://127.0.0.1:{proxy.port}"),
                                topics=Topics(fleet.prefix), state_dir=fleet.controller_dir,
                                key=load_key(fleet.controller_dir), share_group="ctl")
        driver = RolloutDriver(ctx, DeployRequest(selector="@x", hosts=hosts, system=SYSTEM,
                                                  timeout=60))
        with caplog.at_level(logging.WARNING, logger="controller.rollout.driver"):
            outcome = await driver.run()
    assert outcome.status == "succeeded"
    assert any("delivered nothing" in r.getMessage() for r in caplog.records)
    # the agents' events reached the driver (before: only the retained states did)
    assert all(v.last_seq >= 0 for v in outcome.views.values()), \
        {h: v.last_seq for h, v in outcome.views.items()}


def test_readme_shows_the_nats_configuration_the_tests_run() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    node1 = NatsNodeConfig(name="nats1", store_dir=Path("/var/lib/nats"), host="0.0.0.0",
                           routes=("nats2.example.org:6222", "nats3.example.org:6222"))
    assert f"```\n{render_nats_config(node1)}```" in readme


@pytest.fixture
def monitored_nats(tmp_path: Path) -> Iterator[tuple[NatsNode, int]]:
    """One NATS node with its HTTP monitoring port (`/jsz` counts JetStream consumers)."""
    if nats_binary() is None:
        pytest.fail(f"nats-server is not installed: install it with '{NATS_INSTALL}'")
    http = free_port()
    node = NatsNode(tmp_path / "nats", NatsNodeConfig(
        name="monitored", store_dir=tmp_path / "nats" / "js", client_port=free_port(),
        mqtt_port=free_port(), extra=f"http: 127.0.0.1:{http}\n"))
    node.start()
    try:
        yield node, http
    finally:
        node.stop()


def consumers(http: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/jsz", timeout=5) as r:
        return int(json.load(r)["consumers"])


@pytest.mark.parametrize("agent_flags", [(), ("--home-assistant", "--ha-reboot")],
                         ids=["plain", "home-assistant"])
def test_an_idle_agent_holds_no_consumer_and_a_prompt_is_answered_across_a_restart(
        monitored_nats: tuple[NatsNode, int], tmp_path: Path, controller_dir: Path,
        prefix: str, agent_flags: tuple[str, ...]) -> None:
    """NATS makes each QoS 1 subscription of a session a JetStream consumer; one per idle
    agent (its `answer` topic) kept 10,000 agents from ever coming online on a 3-node
    cluster. The agent now subscribes to answers only while a deployment is active, and
    an answer sent while it is down, a prompt open, still reaches it after a restart.
    Home Assistant's commands are not queued either: a button pressed while the host is
    away is not carried out hours later when it is back."""
    node, http = monitored_nats
    fleet = Fleet(tmp_path, node.url, prefix, controller_dir, {"p1": ["p"]},
                  mqtt_version="3.1.1")
    write_inventory(fleet.inventory, fleet.hosts)
    try:
        r = fleet.fleetctl("status")  # creates NATS's MQTT streams; no session kept
        assert r.returncode == 0, r.stderr
        before = consumers(http)
        agent = fleet.start_agent("p1", *agent_flags)
        wait_online(fleet, ["p1"])
        assert consumers(http) == before  # idle: nothing queued for it
        proc = deploy_bg(fleet, "p1", "--system", str(tmp_path), "--approval", "ask",
                         "--timeout", "90")
        wait_prompt(fleet, "p1", "approval")
        assert consumers(http) > before
        agent.kill()
        agent.wait()
        r = fleet.fleetctl("approve", "p1")  # the agent is down: the answer waits for it
        assert r.returncode == 0, r.stdout + r.stderr
        fleet.start_agent("p1", *agent_flags)
        rc, out = finish(proc, timeout=90)
        assert (rc, out["hosts"]) == (0, {"p1": "succeeded"}), out
        # finished, and fleetctl's own session ended: back to what an idle fleet costs
        wait_for(lambda: consumers(http) == before, what="the consumers to go")
    finally:
        fleet.stop()


def readme_nats_authorization(passwords: dict[str, str]) -> str:
    """The README's NATS `authorization` block, as printed there, with one entry per host
    of `passwords` generated from its `web1` entry (as it says to) and plain passwords."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```\nauthorization {", 1)[1].split("```", 1)[0]
    head, rest = block.split("    { user: web1,", 1)
    web1, tail = rest.split("}\n  ]", 1)
    entries = "".join("    { user: " + host + "," + web1.replace("web1", host) + "}\n"
                      for host in passwords if host.startswith("web"))
    text = "authorization {" + head + entries + "  ]" + tail
    for user, password in passwords.items():
        text = text.replace(f'user: {user}, password: "$2a$11$..."',
                            f'user: {user}, password: "{password}"')
    assert "$2a$11$..." not in text, text
    return text


ACL_PASSWORDS = {"flotilla-controller": "ctl-secret", "homeassistant": "ha-secret",
                 "web1": "w1-secret", "web2": "w2-secret"}


@pytest.fixture
def acl_nats(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NatsNode]:
    """One NATS node with the README's permissions; a test's `acl_edit` mark names a
    (text, replacement) to apply to them first."""
    if nats_binary() is None:
        pytest.fail(f"nats-server is not installed: install it with '{NATS_INSTALL}'")
    passwords = ACL_PASSWORDS
    block = readme_nats_authorization(passwords)
    edit = request.node.get_closest_marker("acl_edit")
    if edit is not None:
        assert edit.args[0] in block, edit.args
        block = block.replace(*edit.args)
    node = NatsNode(tmp_path / "nats", NatsNodeConfig(
        name="acl", store_dir=tmp_path / "nats" / "js", client_port=free_port(),
        mqtt_port=free_port(), extra=block))
    for user, password in passwords.items():
        (tmp_path / f"{user}.pw").write_text(password + "\n")
    node.launch()
    try:
        deadline = time.monotonic() + 30
        while mqtt_connack("127.0.0.1", node.config.mqtt_port) != 5:  # anonymous: refused
            assert node.proc is not None and node.proc.poll() is None, \
                node.log_path.read_text()
            assert time.monotonic() < deadline, "NATS did not serve MQTT"
            time.sleep(0.1)
        yield node
    finally:
        node.stop()


def test_the_readme_nats_permissions_carry_a_deploy_and_confine_each_host(
        acl_nats: NatsNode, tmp_path: Path, controller_dir: Path) -> None:
    """The README's per-user NATS permissions are what a fleet runs with: two hosts, each
    its own NATS user, deploy; one waits for an approval that `fleetctl approve` sends
    (its `answer` subscription is permitted: without it nothing reaches the agent); the
    controller reads their states and logs; the `homeassistant` user discovers the host
    that runs with `--home-assistant`; one host cannot read the other's desired state
    (refused SUBACK). The ACL is written for the default prefix, so this fleet uses it
    (its node is its own)."""
    url = f"mqtt://127.0.0.1:{acl_nats.config.mqtt_port}"
    fleet = Fleet(tmp_path, url, "fleet/v1", controller_dir, {"web1": ["web"], "web2": ["web"]},
                  mqtt_version="3.1.1",
                  controller_auth=("flotilla-controller", tmp_path / "flotilla-controller.pw"))
    write_inventory(fleet.inventory, fleet.hosts)
    try:
        for host, flags in (("web1", ("--home-assistant",)), ("web2", ())):
            fleet.start_agent(host, "--username", host, "--password-file",
                              str(tmp_path / f"{host}.pw"), *flags)
        wait_online(fleet, ["web1", "web2"], timeout=40)
        rc, out = fleet.fleetctl_json("deploy", "web1", "--system", SYSTEM, "--timeout", "60")
        assert rc == 0 and out["hosts"] == {"web1": "succeeded"}, out
        waiting = deploy_bg(fleet, "web2", "--system", SYSTEM, "--approval", "ask",
                            "--timeout", "60")
        wait_prompt(fleet, "web2", "approval")
        r = fleet.fleetctl("approve", "web2")
        assert r.returncode == 0, r.stdout + r.stderr
        rc, out = finish(waiting)
        assert rc == 0 and out["hosts"] == {"web2": "succeeded"}, out
        rc, rows = fleet.fleetctl_json("status")
        assert rc == 0 and {r["host"]: r["result"] for r in rows} == {
            "web1": "succeeded", "web2": "succeeded"}, rows
        logs = fleet.fleetctl("logs", "web2")
        assert logs.returncode == 0 and "switch" in logs.stdout, logs.stderr
    finally:
        fleet.stop()

    port = acl_nats.config.mqtt_port

    async def web1_reads_web2() -> list[int]:
        async with mqtt_client(f"mqtt://web1:w1-secret@127.0.0.1:{port}", "3.1.1") as c:
            granted = await c.subscribe("fleet/v1/host/web2/desired", qos=1)
            return [int(getattr(code, "value", code)) for code in granted]

    want = {Topics("fleet/v1").ha_discovery(component, "web1", leaf) for component, leaf in
            (("update", "system"), ("binary_sensor", "online"), ("sensor", "phase"))}

    async def discovered() -> set[str]:
        """What Home Assistant's user receives of web1's retained discovery configs."""
        seen: set[str] = set()
        async with mqtt_client(f"mqtt://homeassistant:ha-secret@127.0.0.1:{port}",
                               "3.1.1") as c:
            await c.subscribe("homeassistant/+/flotilla_web1/+/config")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    async for m in c.messages:
                        seen.add(str(m.topic))
                        if want <= seen:
                            break
        return seen

    assert asyncio.run(web1_reads_web2())[0] >= 0x80
    assert want <= asyncio.run(discovered())


@pytest.mark.acl_edit('"fleet.v1.host.web2.desired", "fleet.v1.host.web2.answer",',
                      '"fleet.v1.host.web2.desired",')
def test_a_refused_answer_subscription_is_reported_not_waited_on_in_silence(
        acl_nats: NatsNode, tmp_path: Path, controller_dir: Path) -> None:
    """Permissions that forget a host's `answer` topic: NATS refuses the subscription,
    so a prompt could never be answered and the agent holds it back. It used to wait
    without a word (the deploy sat in `acked` until its timeout); now the operator reads
    why in the host's log, and the deploy goes on once the broker grants it."""
    url = f"mqtt://127.0.0.1:{acl_nats.config.mqtt_port}"
    fleet = Fleet(tmp_path, url, "fleet/v1", controller_dir, {"web2": ["web"]},
                  mqtt_version="3.1.1",
                  controller_auth=("flotilla-controller", tmp_path / "flotilla-controller.pw"))
    write_inventory(fleet.inventory, fleet.hosts)
    try:
        fleet.start_agent("web2", "--username", "web2", "--password-file",
                          str(tmp_path / "web2.pw"))
        wait_online(fleet, ["web2"], timeout=40)
        waiting = deploy_bg(fleet, "web2", "--system", SYSTEM, "--approval", "ask",
                            "--timeout", "60")

        def told() -> bool:
            r = fleet.fleetctl("logs", "web2")
            return r.returncode == 0 and "refused the subscription to " \
                "fleet/v1/host/web2/answer" in r.stdout and "ACL" in r.stdout

        wait_for(told, timeout=40, what="the refusal in the host's log")
        # the operator fixes the permissions (NATS reloads its configuration on SIGHUP)
        fixed = replace(acl_nats.config, extra=readme_nats_authorization(ACL_PASSWORDS))
        (acl_nats.workdir / f"{fixed.name}.conf").write_text(render_nats_config(fixed))
        assert acl_nats.proc is not None
        acl_nats.proc.send_signal(signal.SIGHUP)
        wait_prompt(fleet, "web2", "approval", timeout=60)
        r = fleet.fleetctl("approve", "web2")
        assert r.returncode == 0, r.stdout + r.stderr
        rc, out = finish(waiting)
        assert rc == 0 and out["hosts"] == {"web2": "succeeded"}, out
    finally:
        fleet.stop()
