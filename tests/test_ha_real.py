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
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from client import homeassistant as ha
from controller.broker import Mosquitto
from controller.cmd_security import set_broker_password
from protocol.broker import BrokerAddress, parse_broker_url
from protocol.topics import Topics
from tests.helpers import Fleet, deploy_bg, finish, wait_for, wait_prompt
from tests.realha import HomeAssistantCore, HomeAssistantMissing
from tests.stepsys import make_db, make_system

REPO = Path(__file__).resolve().parents[1]
T = Topics()  # the shipped ACL names the default prefix
CONTROLLER = "flotilla-controller"
HOSTS = [f"hr{i}" for i in range(1, 9)]


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
    wait_prompt(fleet, "hr1", "approval")
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
