"""The Home Assistant bridge against a real Home Assistant core (issues 10 and 11).

One Home Assistant 2024.3.3 core (its own venv, see tests/realha.py) runs for this
module, connected as broker user `homeassistant` to a Mosquitto that runs the shipped
`mosquitto.conf` with its password file and the shipped `mosquitto.acl`: every agent
logs in with its own credentials. Tests drive Home Assistant through its services
(update.install, select.select_option, button.press) and assert from Home Assistant's
state machine and from the agent's journal and HostState. Each test uses its own hosts,
so the module shares the broker and the core.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from client.ask import homeassistant as ha
from controller.commands.security import set_broker_password
from controller.mqtt.broker import Mosquitto
from protocol.broker import BrokerAddress, parse_broker_url
from protocol.topics import Topics
from tests.helpers import Fleet, deploy_bg, finish, wait_for
from tests.realha import HomeAssistantCore, HomeAssistantMissing
from tests.stepsys import make_db, make_system
from tests.test_security import Collector

REPO = Path(__file__).resolve().parents[1]
T = Topics()  # the shipped ACL names the default prefix
CONTROLLER = "flotilla-controller"
HOSTS = [f"hr{i}" for i in range(1, 9)]
UNTOKENED_REBOOT = '{"action":"reboot"}'  # what the agent's discovery announced before
TOKEN_FILE = "ha-token"


# -- module-wide broker (shipped config + ACL + passwords) and Home Assistant core --------
class Credentials:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.passwd = root / "mosquitto.passwd"
        self.files: dict[str, Path] = {}
        for user in (CONTROLLER, "homeassistant", *HOSTS):
            f = root / f"{user}.password"
            f.write_text(f"{user}-{os.urandom(12).hex()}\n")
            set_broker_password(self.passwd, user, f.read_text().strip())
            self.files[user] = f

    def password(self, user: str) -> str:
        return self.files[user].read_text().strip()


def secured_conf(root: Path, creds: Credentials) -> Path:
    """The shipped mosquitto.conf with the real-fleet auth lines swapped in."""
    out = []
    for line in (REPO / "mosquitto.conf").read_text().splitlines():
        if line.strip() == "allow_anonymous true":
            continue
        if line.startswith("#allow_anonymous false"):
            line = "allow_anonymous false"
        elif line.startswith("#password_file"):
            line = f"password_file {creds.passwd}"
        elif line.startswith("#acl_file"):
            line = f"acl_file {REPO / 'mosquitto.acl'}"
        out.append(line)
    conf = root / "secure-mosquitto.conf"
    conf.write_text("\n".join(out) + "\n")
    return conf


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return Credentials(tmp_path_factory.mktemp("ha-creds"))


@pytest.fixture(scope="module")
def ha_broker(tmp_path_factory: pytest.TempPathFactory, creds: Credentials
              ) -> Iterator[Mosquitto]:
    root = tmp_path_factory.mktemp("ha-broker")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEET_MOSQUITTO_CONF", str(secured_conf(root, creds)))
        b = Mosquitto(root / "broker")
        b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def hass(tmp_path_factory: pytest.TempPathFactory, ha_broker: Mosquitto, creds: Credentials
         ) -> Iterator[HomeAssistantCore]:
    core = HomeAssistantCore(tmp_path_factory.mktemp("hass"), ha_broker.port,
                             "homeassistant", creds.password("homeassistant"))
    try:
        core.start()
    except HomeAssistantMissing as exc:
        pytest.fail(str(exc))  # never a skip: the suite's set-up installs it
    try:
        yield core
    finally:
        core.stop()


@pytest.fixture
def broker(ha_broker: Mosquitto) -> Mosquitto:
    """make_fleet's broker is the module's secured one."""
    return ha_broker


@pytest.fixture
def prefix() -> str:
    return T.prefix


@pytest.fixture(autouse=True)
def controller_credentials(creds: Credentials, monkeypatch: pytest.MonkeyPatch) -> None:
    """fleetctl (run by the tests' helpers) logs in as the controller."""
    monkeypatch.setenv("FLEET_USERNAME", CONTROLLER)
    monkeypatch.setenv("FLEET_PASSWORD_FILE", str(creds.files[CONTROLLER]))


def start_agent(fleet: Fleet, creds: Credentials, host: str, *extra: str) -> Any:
    return fleet.start_agent(host, "--username", host, "--password-file",
                             str(creds.files[host]), "--home-assistant", *extra)


def address(ha_broker: Mosquitto, creds: Credentials, user: str) -> BrokerAddress:
    return parse_broker_url(ha_broker.url).with_credentials(user, creds.password(user))


async def publish(addr: BrokerAddress, topic: str, payload: bytes, retain: bool = False) -> None:
    async with aiomqtt.Client(**addr.client_kwargs(), protocol=aiomqtt.ProtocolVersion.V5,
                              timeout=5) as c:
        await c.publish(topic, payload, qos=1, retain=retain)


def entity(hass: HomeAssistantCore, domain: str, host: str, object_id: str) -> str:
    return hass.entity_id(domain, f"flotilla_{host}_{object_id}")


def open_prompt(hass: HomeAssistantCore, host: str, kind: str) -> str:
    """The id of the host's open prompt of `kind`, from HA's phase sensor attributes."""
    phase = entity(hass, "sensor", host, "phase")
    suffix = {"approval": ".approve", "choice": ".choose", "reboot": ".reboot"}[kind]
    st = hass.wait_state(phase, lambda s: str(s["attributes"].get("open_prompt")
                                              ).endswith(suffix), 30,
                         f"a {kind} prompt on {host} in Home Assistant")
    return str(st["attributes"]["open_prompt"])


def journal_answers(fleet: Fleet, host: str) -> list[dict[str, Any]]:
    return [r for r in fleet.journal(host) if r["kind"] == "answer"]


def agent_log(fleet: Fleet, host: str) -> str:
    return (fleet.root / "agents" / f"{host}.log").read_text(errors="replace")


# -- A: the entities as Home Assistant builds them, and Install --------------------------
def test_real_ha_discovers_the_host_and_install_approves(make_fleet, creds: Credentials,  # type: ignore[no-untyped-def]
                                                         hass: HomeAssistantCore) -> None:
    fleet = make_fleet({"hr1": ["home"]})
    start_agent(fleet, creds, "hr1")
    update = entity(hass, "update", "hr1", "system")
    phase = entity(hass, "sensor", "hr1", "phase")
    online = entity(hass, "binary_sensor", "hr1", "online")
    result = entity(hass, "sensor", "hr1", "last_result")
    # HA 2024.3 ignores default_entity_id: ids come from device and entity names
    assert update == "update.hr1_system" and phase == "sensor.hr1_phase"
    hass.wait_state(online, lambda s: s["state"] == "on", what="the host online in HA")
    hass.wait_state(phase, lambda s: s["state"] == "idle")
    hass.wait_state(result, lambda s: s["state"] == "none")
    st = hass.wait_state(update, lambda s: s["state"] == "off")  # up to date
    assert st["attributes"]["title"] == "NixOS system of hr1"
    # no --ha-reboot: Home Assistant has no Reboot button for this host
    assert hass.request({"op": "entity_id", "domain": "button",
                         "unique_id": "flotilla_hr1_reboot"})["entity_id"] is None

    proc = deploy_bg(fleet, "hr1", "--system", "/nix/store/ha-real-sys", "--approval", "ask",
                     "--timeout", "60")
    open_prompt(hass, "hr1", "approval")
    st = hass.wait_state(update, lambda s: s["state"] == "on", what="HA to offer the update")
    assert st["attributes"]["in_progress"] is False
    assert "waiting for approval" in st["attributes"]["release_summary"]
    hass.wait_state(phase, lambda s: s["state"] == "awaiting_approval")
    reply = hass.call("update", "install", entity_id=update)
    assert reply["ok"], reply
    rc, out = finish(proc)
    assert rc == 0 and out["hosts"] == {"hr1": "succeeded"}, out
    st = hass.wait_state(update, lambda s: s["state"] == "off" and
                         s["attributes"]["in_progress"] is False,
                         what="HA to show the update installed")
    assert st["attributes"]["installed_version"].startswith("1 (")
    hass.wait_state(result, lambda s: s["state"] == "succeeded")
    answers = journal_answers(fleet, "hr1")
    assert [(a["source"], a["choices"]) for a in answers] == [
        ("homeassistant", {"deploy.approve": "approve"})]


def snapshot(hass: HomeAssistantCore, *entity_ids: str) -> list[dict[str, Any] | None]:
    states = hass.states()
    return [states.get(e) for e in entity_ids]


# -- A + B: a migration choice answered by a select; Install is not offered meanwhile ----
async def test_real_ha_select_answers_a_migration_choice(make_fleet, creds: Credentials,  # type: ignore[no-untyped-def]
                                                         ha_broker: Mosquitto,
                                                         hass: HomeAssistantCore,
                                                         tmp_path: Path) -> None:
    fleet = make_fleet({"hr2": ["home"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=1.0)
    start_agent(fleet, creds, "hr2")
    update = entity(hass, "update", "hr2", "system")
    phase = entity(hass, "sensor", "hr2", "phase")
    hat = ha.HaTopics.of(T, "hr2")
    async with Collector(address(ha_broker, creds, "homeassistant"), [hat.update, hat.state]
                         ) as seen:
        proc = deploy_bg(fleet, "hr2", "--system", str(top), "--timeout", "90")
        select = entity(hass, "select", "hr2", ha.select_object_id("db.major"))
        st = hass.wait_state(select, lambda s: s["state"] != "unavailable")
        assert st["attributes"]["options"] == ["upgrade", "dump-restore"]
        assert st["attributes"]["destructive_choices"] == ["dump-restore"]
        hass.wait_state(phase, lambda s: s["state"] == "awaiting_choice")
        # waiting for a choice is not waiting for approval: HA offers no Install
        hass.wait_state(update, lambda s: s["state"] == "off")
        reply = hass.call("update", "install", entity_id=update)
        assert not reply["ok"] and "No update available" in reply["error"], reply
        reply = hass.call("select", "select_option", entity_id=select, option="dump-restore")
        assert reply["ok"], reply
        rc, out = await asyncio.to_thread(finish, proc, 90)
        assert rc == 0 and out["hosts"] == {"hr2": "succeeded"}, out
    assert (db / "data").read_bytes() == original + b"restored-dump-restore\napp\n"
    answers = journal_answers(fleet, "hr2")
    assert [(a["source"], a["choices"]) for a in answers] == [
        ("homeassistant", {"db.major": "dump-restore"})]
    # while the migrations ran, the update entity's JSON said "in progress" (read by HA
    # versions newer than this one, which ignores in_progress), never Install
    updates = [(json.loads(p), t) for t, p in seen.got if p]
    phases = [u["phase"] for u, t in updates if t == hat.state]
    assert "migrating" in phases
    after_choice = [u for u, t in updates if t == hat.update][1:]
    assert any(u["in_progress"] for u in after_choice)
    assert all(u["latest_version"] == u["installed_version"] for u in after_choice)
    # the prompt closed: Home Assistant removed the select
    hass.wait_for(lambda: hass.request({"op": "entity_id", "domain": "select", "unique_id":
                                        f"flotilla_hr2_{ha.select_object_id('db.major')}"}
                                       )["entity_id"] is None, 20, "the select to go")
    st = hass.wait_state(update, lambda s: s["state"] == "off"
                         and s["attributes"]["installed_version"].startswith("1 ("))


def reboot_system(tmp_path: Path) -> Path:
    top = tmp_path / "sys-new-kernel"
    top.mkdir()
    (top / "sim-needs-reboot").write_text("kernel differs\n")
    return top


def ha_token(fleet: Fleet, host: str) -> str:
    """What a host's own discovery carries (read here from the agent's state dir)."""
    path = fleet.state_dir(host) / TOKEN_FILE
    return path.read_text().strip() if path.exists() else "no-token-file"


# -- C: Home Assistant commands gated by the agent's own configuration -------------------
async def test_no_reboot_from_home_assistant_without_ha_reboot(make_fleet, creds: Credentials,  # type: ignore[no-untyped-def]
                                                               ha_broker: Mosquitto,
                                                               hass: HomeAssistantCore,
                                                               tmp_path: Path) -> None:
    fleet = make_fleet({"hr3": ["home"]})
    start_agent(fleet, creds, "hr3")  # --home-assistant only
    entity(hass, "update", "hr3", "system")
    proc = deploy_bg(fleet, "hr3", "--system", str(reboot_system(tmp_path)), "--reboot", "ask",
                     "--timeout", "90")
    prompt = {"prompt_id": open_prompt(hass, "hr3", "reboot")}
    token = ha_token(fleet, "hr3")
    # no Reboot button, and no select for the reboot question
    assert hass.request({"op": "entity_id", "domain": "button",
                         "unique_id": "flotilla_hr3_reboot"})["entity_id"] is None
    assert hass.request({"op": "entity_id", "domain": "select", "unique_id":
                         f"flotilla_hr3_{ha.select_object_id('deploy.reboot')}"}
                        )["entity_id"] is None
    # Home Assistant's broker user, even with the host's own token, cannot reboot it:
    # neither the button's topic nor the prompt's answer topic
    home = address(ha_broker, creds, "homeassistant")
    hat = ha.HaTopics.of(T, "hr3")
    await publish(home, hat.reboot, json.dumps({"action": "reboot", "token": token}).encode())
    await publish(home, hat.reboot, UNTOKENED_REBOOT.encode())
    await publish(home, hat.answer, json.dumps({"prompt_id": prompt["prompt_id"],
                                                "key": "deploy.reboot", "choice": "now",
                                                "token": token}).encode())
    await asyncio.to_thread(wait_for, lambda: agent_log(fleet, "hr3").count(
        "--ha-reboot") >= 2 and "wrong token" in agent_log(fleet, "hr3"), 20, 0.2,
        "the agent to refuse the three reboot commands")
    assert journal_answers(fleet, "hr3") == []
    assert not [r for r in fleet.journal("hr3") if r.get("key") == "reboot_boot_id"]
    # the prompt is still open; the operator says "later"
    assert open_prompt(hass, "hr3", "reboot") == prompt["prompt_id"]
    r = fleet.fleetctl("answer", "hr3", prompt["prompt_id"], "deploy.reboot=later")
    assert r.returncode == 0, r.stderr
    rc, out = await asyncio.to_thread(finish, proc, 60)
    assert rc == 0 and out["hosts"] == {"hr3": "succeeded"}, out
    assert [a["source"] for a in journal_answers(fleet, "hr3")] == ["remote"]


# -- C: another host's spoofed discovery commands nothing --------------------------------
async def test_spoofed_discovery_from_another_host_commands_nothing(  # type: ignore[no-untyped-def]
        make_fleet, creds: Credentials, ha_broker: Mosquitto, hass: HomeAssistantCore,
        tmp_path: Path) -> None:
    fleet = make_fleet({"hr5": ["home"], "hr6": ["home"]})
    agent = start_agent(fleet, creds, "hr5", "--ha-reboot")
    button = entity(hass, "button", "hr5", "reboot")
    proc = deploy_bg(fleet, "hr5", "--system", str(reboot_system(tmp_path)), "--reboot", "ask",
                     "--timeout", "90")
    prompt = {"prompt_id": open_prompt(hass, "hr5", "reboot")}
    hass.wait_state(button, lambda s: s["state"] != "unavailable",
                    what="the Reboot button to be available while the reboot prompt is open")
    # hr6 announces, under its own discovery node (all the ACL lets it write), entities
    # claiming hr5's device and commanding hr5's topics
    hat = ha.HaTopics.of(T, "hr5")
    device = {"identifiers": ["flotilla_hr5"], "name": "hr5"}
    spoofs = {
        "button": {"name": "Reboot now", "unique_id": "flotilla_hr6_spoof_button",
                   "device": device, "command_topic": hat.reboot,
                   "payload_press": UNTOKENED_REBOOT},
        "select": {"name": "Reboot choice", "unique_id": "flotilla_hr6_spoof_select",
                   "device": device, "command_topic": hat.answer, "options": ["now"],
                   "command_template": json.dumps(
                       {"prompt_id": prompt["prompt_id"], "key": "deploy.reboot",
                        "choice": "CHOICE", "token": "guessed"}).replace(
                            "CHOICE", "{{ value }}")},
        "update": {"name": "System", "unique_id": "flotilla_hr6_spoof_update",
                   "device": device, "command_topic": hat.install,
                   "state_topic": "fleet/v1/host/hr6/ha/spoof",
                   "payload_install": json.dumps({"action": "install"})},
    }
    hr6 = address(ha_broker, creds, "hr6")
    for component, config in spoofs.items():
        await publish(hr6, f"homeassistant/{component}/flotilla_hr6/spoof/config",
                      json.dumps(config).encode(), retain=True)
    await publish(hr6, "fleet/v1/host/hr6/ha/spoof",
                  b'{"installed_version":"1","latest_version":"2"}', retain=True)
    spoof_button = hass.entity_id("button", "flotilla_hr6_spoof_button")
    spoof_update = hass.entity_id("update", "flotilla_hr6_spoof_update")
    hass.wait_state(spoof_update, lambda s: s["state"] == "on")
    assert hass.call("update", "install", entity_id=spoof_update)["ok"]
    spoof_select = hass.entity_id("select", "flotilla_hr6_spoof_select")
    assert hass.call("button", "press", entity_id=spoof_button)["ok"]
    assert hass.call("select", "select_option", entity_id=spoof_select, option="now")["ok"]
    await asyncio.to_thread(wait_for, lambda: agent_log(fleet, "hr5").count(
        "wrong token") >= 3, 20, 0.2,
        "hr5 to refuse the spoofed commands")
    assert journal_answers(fleet, "hr5") == []
    assert open_prompt(hass, "hr5", "reboot") == prompt["prompt_id"]
    # the token never shows in Home Assistant's state machine (templates read only that)
    assert ha_token(fleet, "hr5") not in json.dumps(hass.states())
    # the genuine button reboots hr5
    assert hass.call("button", "press", entity_id=button)["ok"]
    await asyncio.to_thread(wait_for, lambda: any(
        r.get("key") == "reboot_boot_id" for r in fleet.journal("hr5")), 20, 0.2,
        "the journaled reboot")
    answers = journal_answers(fleet, "hr5")
    assert [(a["source"], a["choices"]) for a in answers] == [
        ("homeassistant", {"deploy.reboot": "now"})]
    proc.terminate()  # the deploy would finish after the boot; not this test's subject
    proc.wait(timeout=10)
    agent.kill()  # the host goes down for its reboot
    agent.wait()
    for component in spoofs:
        await publish(hr6, f"homeassistant/{component}/flotilla_hr6/spoof/config", b"",
                      retain=True)
    await publish(hr6, "fleet/v1/host/hr6/ha/spoof", b"", retain=True)


# -- B: the Reboot button while a reboot is pending ---------------------------------------
@pytest.mark.parametrize("policy", ["ask", "window"])
def test_real_ha_reboot_button_starts_the_pending_reboot(make_fleet, creds: Credentials,  # type: ignore[no-untyped-def]
                                                         hass: HomeAssistantCore,
                                                         tmp_path: Path, policy: str) -> None:
    host = "hr4" if policy == "ask" else "hr7"
    fleet = make_fleet({host: ["home"]})
    agent = start_agent(fleet, creds, host, "--ha-reboot")
    button = entity(hass, "button", host, "reboot")
    needs = entity(hass, "binary_sensor", host, "needs_reboot")
    update = entity(hass, "update", host, "system")
    hass.wait_state(button, lambda s: s["state"] == "unavailable")  # nothing pending yet
    if policy == "window":  # a window that opened an hour ago closed: wait for tomorrow's
        now = datetime.now().astimezone()
        start, end = now - timedelta(hours=2), now - timedelta(hours=1)
        policy = f"window {start:%H:%M}-{end:%H:%M}"
    top = reboot_system(tmp_path)
    proc = deploy_bg(fleet, host, "--system", str(top), "--reboot", policy, "--timeout", "90")
    open_prompt(hass, host, "reboot")
    hass.wait_state(button, lambda s: s["state"] != "unavailable",
                    what="the Reboot button available while the reboot is pending")
    hass.wait_state(needs, lambda s: s["state"] == "on",
                    what="Needs reboot on while the reboot is pending")
    assert hass.call("update", "install", entity_id=update)["ok"] is False  # not approval
    assert hass.call("button", "press", entity_id=button)["ok"]
    wait_for(lambda: any(r.get("key") == "reboot_boot_id" for r in fleet.journal(host)),
             20, 0.2, "the journaled reboot")
    agent.kill()  # the machine goes down...
    agent.wait()
    start_agent(fleet, creds, host, "--ha-reboot")  # ...and boots the new system
    rc, out = finish(proc, 90)
    assert rc == 0 and out["hosts"] == {host: "succeeded"}, out
    answers = journal_answers(fleet, host)
    assert [(a["source"], a["choices"]) for a in answers] == [
        ("homeassistant", {"deploy.reboot": "now"})]
    hass.wait_state(needs, lambda s: s["state"] == "off")
    hass.wait_state(button, lambda s: s["state"] == "unavailable")
