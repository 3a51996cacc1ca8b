"""Issue 6 end to end: the real agent, a real broker, a client acting as Home Assistant
(JSON in, JSON out), the on-host prompt through a pseudo-terminal, and deadlines."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import jinja2
import pexpect

from protocol.broker import parse_broker_url
from tests.helpers import deploy_bg, finish, wait_for, wait_prompt
from tests.stepsys import make_db, make_system


class HomeAssistant:
    """Reads retained discovery configs and JSON state like HA does; presses buttons."""

    def __init__(self, url: str) -> None:
        self.address = parse_broker_url(url)
        self.configs: dict[str, dict[str, Any]] = {}
        self.states: dict[str, Any] = {}
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HomeAssistant:
        ready = asyncio.Event()

        async def run() -> None:
            async with aiomqtt.Client(**self.address.client_kwargs(),
                                      protocol=aiomqtt.ProtocolVersion.V5) as client:
                self._client = client
                await client.subscribe("homeassistant/#")
                await client.subscribe("+/+/host/+/ha/#")
                await client.subscribe("+/+/host/+/online")
                ready.set()
                async for m in client.messages:
                    topic = str(m.topic)
                    payload = m.payload if isinstance(m.payload, bytes) else b""
                    if topic.startswith("homeassistant/") and topic.endswith("/config"):
                        if payload:
                            self.configs[topic] = json.loads(payload)  # JSON, not msgpack
                        else:
                            self.configs.pop(topic, None)
                    elif payload:
                        try:
                            self.states[topic] = json.loads(payload)
                        except ValueError:
                            self.states[topic] = payload.decode()
        self._task = asyncio.create_task(run())
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def entity(self, component: str, host: str, timeout: float = 20,
                     object_contains: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for topic, cfg in self.configs.items():
                if topic.startswith(f"homeassistant/{component}/flotilla_{host}/") \
                        and object_contains in topic:
                    return cfg
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {component} entity for {host}: {sorted(self.configs)}")

    async def send(self, topic: str, payload: str) -> None:
        assert self._client is not None
        await self._client.publish(topic, payload.encode(), qos=1)





async def test_home_assistant_install_approves_a_waiting_deploy(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"ha1": ["home"]})
    async with HomeAssistant(fleet.broker_url) as hass:
        fleet.start_agent("ha1", "--home-assistant")
        update = await hass.entity("update", "ha1")
        assert "default_entity_id" in update and "object_id" not in update
        connectivity = await hass.entity("binary_sensor", "ha1", object_contains="/online/")
        assert connectivity["device_class"] == "connectivity"
        proc = deploy_bg(fleet, "ha1", "--system", "/nix/store/ha-sys", "--approval", "ask",
                         "--timeout", "60")
        await asyncio.to_thread(wait_prompt, fleet, "ha1", "approval")
        state_topic = update["state_topic"]
        wait_for(lambda: isinstance(hass.states.get(state_topic), dict)
                 and hass.states[state_topic].get("latest_version")
                 != hass.states[state_topic].get("installed_version"),
                 timeout=10, what="HA to see a newer version")
        await hass.send(update["command_topic"], update["payload_install"])
        rc, out = await asyncio.to_thread(finish, proc)
        assert rc == 0 and out["hosts"] == {"ha1": "succeeded"}, out

        def up_to_date() -> bool:
            st = hass.states.get(state_topic)
            return isinstance(st, dict) and st.get("installed_version") == st.get(
                "latest_version") and st.get("in_progress") is False
        wait_for(up_to_date, timeout=10, what="HA to show the update installed")


async def test_home_assistant_select_answers_a_prompt(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"ha2": ["home"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05)
    async with HomeAssistant(fleet.broker_url) as hass:
        fleet.start_agent("ha2", "--home-assistant")
        proc = deploy_bg(fleet, "ha2", "--system", str(top), "--timeout", "60")
        select = await hass.entity("select", "ha2")
        assert select["options"] == ["upgrade", "dump-restore"]
        payload = jinja2.Template(select["command_template"]).render(value="dump-restore")
        await hass.send(select["command_topic"], payload)
        rc, out = await asyncio.to_thread(finish, proc)
        assert rc == 0 and out["hosts"] == {"ha2": "succeeded"}, out
        assert (db / "data").read_bytes() == original + b"restored-dump-restore\napp\n"
        answers = [r for r in fleet.journal("ha2") if r["kind"] == "answer"]
        assert answers[-1]["source"] == "homeassistant"
        # the select disappears once the prompt is closed
        wait_for(lambda: not any("/select/" in t for t in hass.configs), timeout=10,
                 what="the select entity to be removed")


def test_fleet_agent_prompt_through_a_terminal(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"tty1": ["x"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05)
    fleet.start_agent("tty1", "--control-group", "root")
    proc = deploy_bg(fleet, "tty1", "--system", str(top), "--timeout", "60")
    prompt = wait_prompt(fleet, "tty1", "choice")
    child = pexpect.spawn(sys.executable, ["-m", "client", "prompt", "--state-dir",
                                           str(fleet.state_dir("tty1"))],
                          encoding="utf-8", timeout=20)
    child.expect("db.major")
    child.expect("DESTRUCTIVE")           # dump-restore is marked
    child.expect(r"\[Enter = upgrade\]")  # the default is preselected
    child.sendline("2")                   # choose the second option (dump-restore)
    child.expect("(?i)yes")       # a destructive choice needs a typed confirmation
    child.sendline("yes")
    child.expect("(?i)accepted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    rc, out = finish(proc)
    assert rc == 0, out
    assert (db / "data").read_bytes() == original + b"restored-dump-restore\napp\n"
    answers = [r for r in fleet.journal("tty1") if r["kind"] == "answer"]
    assert answers[-1]["source"].startswith("local:")
    assert answers[-1]["prompt_id"] == prompt["prompt_id"]
    # a scripted answer to the closed prompt is refused: the first answer won
    r = subprocess.run([sys.executable, "-m", "client", "prompt", "--state-dir",
                        str(fleet.state_dir("tty1")), "--answer", prompt["prompt_id"],
                        "db.major=upgrade"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_deadline_takes_the_default_and_records_it(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"dl1": ["x"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05)
    fleet.start_agent("dl1")
    rc, out = fleet.fleetctl_json("deploy", "dl1", "--system", str(top), "--prompt-deadline",
                                  "1.5", "--take-default", "--timeout", "60")
    assert rc == 0, out
    assert (db / "data").read_bytes() == original + b"upgraded-upgrade\napp\n"
    answers = [r for r in fleet.journal("dl1") if r["kind"] == "answer"]
    assert len(answers) == 1
    assert answers[0]["source"] == "deadline" and answers[0]["choices"] == {"db.major": "upgrade"}
    prompts = [r for r in fleet.journal("dl1") if r["kind"] == "prompt"]
    assert prompts[0]["prompt"]["deadline"] is not None


def test_fleetctl_approve_releases_hosts_waiting_for_approval(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"ap1": ["x"], "ap2": ["x"]})
    fleet.start_simulated(["ap1", "ap2"])
    proc = deploy_bg(fleet, "@x", "--system", "/nix/store/approved", "--approval", "ask",
                     "--timeout", "60")
    for host in ("ap1", "ap2"):
        wait_prompt(fleet, host, "approval")
    _, status = fleet.fleetctl_json("status")
    assert {r["phase"] for r in status} == {"awaiting_approval"}
    assert all(r["system"] is None for r in status)  # nothing switched before approval
    rc, out = fleet.fleetctl_json("approve", "@x")
    assert rc == 0 and set(out) == {"ap1", "ap2"} and all(v["accepted"] for v in out.values())
    rc, result = finish(proc)
    assert rc == 0 and result["succeeded"] == 2, result
