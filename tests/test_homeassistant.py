"""Home Assistant discovery (issue 6): schemas from HA's MQTT docs, state JSON, commands.

Every discovery payload is validated against tests/schemas/<component>.json. The
templates Home Assistant evaluates are rendered with Jinja's immutable sandbox (the
environment HA uses), so a template that reads the wrong key fails here, not in a
living room. The end-to-end test runs a real Mosquitto with a plain MQTT client
acting as Home Assistant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from referencing import Registry, Resource

from client import homeassistant as ha
from protocol.broker import parse_broker_url
from protocol.models import Choice, DeployPolicy, Desired, HostState, Prompt, ReportItem
from protocol.topics import Topics

SCHEMAS = Path(__file__).parent / "schemas"
COMPONENTS = ("update", "binary_sensor", "sensor", "button", "select")
HOST = "web-1"
SYSTEM_OLD = "/nix/store/" + "a" * 32 + "-nixos-system-web-1-25.05"
SYSTEM_NEW = "/nix/store/" + "b" * 32 + "-nixos-system-web-1-25.11"


# -- schema plumbing -----------------------------------------------------------------------

def _registry() -> Registry:
    resources = []
    for path in SCHEMAS.glob("*.json"):
        contents = json.loads(path.read_text())
        resources.append((path.name, Resource.from_contents(contents)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(schema, registry=REGISTRY)


def component_of(topic: str, topics: Topics) -> str:
    head, component, node, _obj, tail = topic.split("/")
    assert head == topics.ha_prefix and tail == "config" and node == f"flotilla_{HOST}"
    return component


# -- Home Assistant's side of templates ---------------------------------------------------

JINJA = ImmutableSandboxedEnvironment()


def render(template: str, payload: bytes | str | None = None, **extra: Any) -> str:
    """Render like HA: `value` is the payload text, `value_json` its JSON (if any)."""
    ctx: dict[str, Any] = dict(extra)
    if payload is not None:
        text = payload.decode() if isinstance(payload, bytes) else payload
        ctx["value"] = text
        with contextlib.suppress(ValueError):
            ctx["value_json"] = json.loads(text)
    return JINJA.from_string(template).render(**ctx)


# -- fixtures --------------------------------------------------------------------------------

def make_prompt(prompt_id: str = "p-1", kind: str = "choice", deadline: float | None = None
                ) -> Prompt:
    return Prompt(
        host=HOST, prompt_id=prompt_id, deployment_id="d-7", generation=7, kind=kind,
        created_at=1000.0, deadline=deadline,
        items=[
            ReportItem(step="postgres", id="major-upgrade", severity="warning",
                       message="PostgreSQL 15 -> 16 needs a data migration",
                       choices=[Choice(id="migrate", label="Migrate", description="pg_upgrade"),
                                Choice(id="fresh", label="Start empty",
                                       description="drops all databases", destructive=True)],
                       default="migrate"),
            ReportItem(step="nextcloud", id="apps", severity="recommendation",
                       message="3 apps are incompatible",
                       choices=[Choice(id="disable"), Choice(id="keep")], default=None),
            ReportItem(step="nginx", id="note", severity="warning", message="no choice here"),
        ],
    )


def make_state(**kw: Any) -> HostState:
    base: dict[str, Any] = dict(host=HOST, system=SYSTEM_OLD, generation=6, phase="idle",
                                desired_generation=6, updated_at=1000.0)
    base.update(kw)
    return HostState(**base)


def make_desired(**kw: Any) -> Desired:
    base: dict[str, Any] = dict(host=HOST, deployment_id="d-7", rollout_id="r-3", generation=7,
                                system=SYSTEM_NEW, issued_at=999.0)
    base.update(kw)
    return Desired(**base)


@pytest.fixture
def topics() -> Topics:
    return Topics("fleet/v1")


# -- the schemas themselves ------------------------------------------------------------------

def test_schemas_are_valid_draft_2020_12() -> None:
    names = sorted(p.stem for p in SCHEMAS.glob("*.json"))
    assert set(COMPONENTS) | {"common", "update_state"} == set(names)
    for name in names:
        jsonschema.Draft202012Validator.check_schema(json.loads((SCHEMAS / f"{name}.json")
                                                                .read_text()))


def _good_sensor(topics: Topics) -> dict[str, Any]:
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=False, prompt=None))
    return dict(json.loads(msgs[topics.ha_discovery("sensor", HOST, "phase")]))


@pytest.mark.parametrize(("mutation", "why"), [
    (lambda c: c.update(object_id="x"), "object_id is deprecated"),
    (lambda c: c.pop("default_entity_id"), "default_entity_id required (policy)"),
    (lambda c: c.update(default_entity_id="binary_sensor.x"), "domain must match component"),
    (lambda c: c.pop("unique_id"), "unique_id required for device"),
    (lambda c: c.update(device={"name": "x"}), "device needs identifiers or connections"),
    (lambda c: c.update(device_class="colour"), "unknown device class"),
    (lambda c: c.update(device_class=None), "options only with enum"),
    (lambda c: c.update(unit_of_measurement="%"), "enum has no unit"),
    (lambda c: c.update(state_topic="a/+/b"), "wildcard in a state topic"),
    (lambda c: c.update(availability_topic="x"), "availability and availability_topic"),
    (lambda c: c.update(colour="red"), "unknown key"),
    (lambda c: c.update(entity_category="config"), "sensors may only be diagnostic"),
    (lambda c: c.update(platform="sensor"), "platform only in device discovery"),
])
def test_schema_rejects(topics: Topics, mutation: Any, why: str) -> None:
    config = _good_sensor(topics)
    validator("sensor").validate(config)  # the unmodified payload passes
    mutation(config)
    assert list(validator("sensor").iter_errors(config)), why


@pytest.mark.parametrize(("payload", "why"), [
    ({"installed_version": "1", "latest_version": "2", "phase": "idle"}, "extra key"),
    ({"installed_version": "1", "latest_version": "2", "release_summary": None}, "null string"),
    ({"installed_version": "1", "latest_version": "2", "update_percentage": 101}, "> 100"),
    ({"installed_version": "1", "latest_version": "2", "release_summary": "x" * 256}, "> 255"),
])
def test_update_state_schema_rejects(payload: dict[str, Any], why: str) -> None:
    assert list(validator("update_state").iter_errors(payload)), why


# -- discovery --------------------------------------------------------------------------------

@pytest.mark.parametrize("reboot_allowed", [False, True])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_every_discovery_payload_matches_its_schema(topics: Topics, reboot_allowed: bool,
                                                    with_prompt: bool) -> None:
    prompt = make_prompt() if with_prompt else None
    msgs = ha.discovery_messages(topics, HOST, reboot_allowed=reboot_allowed, prompt=prompt)
    seen: dict[str, int] = {}
    unique_ids: set[str] = set()
    entity_ids: set[str] = set()
    for topic, payload in msgs:
        component = component_of(topic, topics)
        seen[component] = seen.get(component, 0) + 1
        if not payload:
            assert component == "button" and not reboot_allowed
            continue
        config = json.loads(payload)
        validator(component).validate(config)
        assert config["default_entity_id"].startswith(f"{component}.flotilla_web_1_")
        assert config["unique_id"] not in unique_ids and config["default_entity_id"] not in \
            entity_ids
        unique_ids.add(config["unique_id"])
        entity_ids.add(config["default_entity_id"])
        assert config["device"]["identifiers"] == [f"flotilla_{HOST}"]
        assert config["device"]["name"] == HOST
        assert {"manufacturer", "model", "sw_version"} <= set(config["device"])
        online = topics.online(HOST)
        if config.get("device_class") == "connectivity":
            assert "availability" not in config and config["state_topic"] == online
        else:
            assert config["availability"][0]["topic"] == online
    # two answerable items -> two selects; the item without choices gets none
    assert seen == {"update": 1, "binary_sensor": 2, "sensor": 2, "button": 1,
                    **({"select": 2} if with_prompt else {})}


def test_update_entity_config(topics: Topics) -> None:
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=False, prompt=None))
    config = json.loads(msgs[topics.ha_discovery("update", HOST, "system")])
    assert config["state_topic"] == topics.ha_host(HOST, "update")
    assert config["command_topic"] == topics.ha_host(HOST, "update/install")
    assert json.loads(config["payload_install"]) == {"action": "install"}
    # title and summary live in the state JSON: in a config they would freeze them
    assert "title" not in config and "release_summary" not in config


def test_reboot_button_is_unavailable_unless_a_reboot_may_be_taken(topics: Topics) -> None:
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=True, prompt=None))
    button = json.loads(msgs[topics.ha_discovery("button", HOST, "reboot")])
    assert button["availability_mode"] == "all"
    gate = button["availability"][1]
    assert gate["topic"] == topics.ha_host(HOST, "state")
    desired = make_desired(policy=DeployPolicy(reboot="ask"))
    cases = [
        (make_state(needs_reboot=False), desired, "offline"),
        (make_state(needs_reboot=True), desired, "online"),
        (make_state(needs_reboot=True), make_desired(), "offline"),  # policy reboot=never
        (make_state(needs_reboot=True), None, "offline"),
    ]
    for state, d, expected in cases:
        payload = json.dumps(ha.state_payload(state, None, d))
        assert render(gate["value_template"], payload) == expected, (state, d)
    assert json.loads(button["payload_press"]) == {"action": "reboot"}


def test_prompt_selects(topics: Topics) -> None:
    prompt = make_prompt()
    selects = ha.prompt_select_messages(topics, HOST, prompt)
    by_key = {}
    for payload in selects.values():
        config = json.loads(payload)
        by_key[config["name"].removeprefix("Choice ")] = config
    assert set(by_key) == {"postgres.major-upgrade", "nextcloud.apps"}
    pg = by_key["postgres.major-upgrade"]
    assert pg["options"] == ["migrate", "fresh"]
    # what HA publishes when a person picks "fresh"
    command = json.loads(render(pg["command_template"], value="fresh"))
    assert command == {"prompt_id": "p-1", "key": "postgres.major-upgrade", "choice": "fresh"}
    # state: nothing chosen yet -> 'None' (HA: no current option); then the answer
    state = ha.prompt_payload(prompt)
    assert render(pg["value_template"], json.dumps(state)) == "None"
    state = ha.prompt_payload(prompt, {"postgres.major-upgrade": "migrate"})
    assert render(pg["value_template"], json.dumps(state)) == "migrate"
    # attributes: the question, its choices and which are destructive
    attrs = json.loads(render(pg["json_attributes_template"], json.dumps(state)))
    assert attrs["message"].startswith("PostgreSQL 15")
    assert attrs["default"] == "migrate" and attrs["destructive_choices"] == ["fresh"]
    # a closed prompt's state keeps the template working
    assert render(pg["value_template"], json.dumps(ha.prompt_payload(None))) == "None"
    assert json.loads(render(pg["json_attributes_template"],
                             json.dumps(ha.prompt_payload(None)))) == {}


def test_select_object_ids_do_not_collide() -> None:
    a, b = ha.select_object_id("a.b_c"), ha.select_object_id("a_b.c")
    assert a != b and a.startswith("choice_a_b_c_")


def test_items_ha_cannot_carry_are_skipped(topics: Topics, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    prompt = Prompt(host=HOST, prompt_id="p", deployment_id="d", generation=1, created_at=0,
                    items=[ReportItem(step="s", id='we"ird', severity="error", message="m",
                                      choices=[Choice(id="x")])])
    with caplog.at_level(logging.WARNING):
        assert ha.prompt_select_messages(topics, HOST, prompt) == {}
    assert "fleet-agent prompt" in caplog.text


def test_sensor_templates_read_the_state_json(topics: Topics) -> None:
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=False, prompt=None))
    cfg = {obj: json.loads(msgs[topics.ha_discovery(comp, HOST, obj)])
           for comp, obj in [("sensor", "phase"), ("sensor", "last_result"),
                             ("binary_sensor", "needs_reboot")]}
    state = make_state(phase="awaiting_reboot", last_result=None, needs_reboot=True)
    payload = json.dumps(ha.state_payload(state, None, None))
    assert render(cfg["phase"]["value_template"], payload) == "awaiting_reboot"
    assert render(cfg["last_result"]["value_template"], payload) == "none"
    assert "none" in cfg["last_result"]["options"]
    assert render(cfg["needs_reboot"]["value_template"], payload) == "ON"
    for phase in cfg["phase"]["options"]:
        rendered = render(cfg["phase"]["value_template"],
                          json.dumps(ha.state_payload(make_state(phase=phase), None, None)))
        assert rendered in cfg["phase"]["options"]


# -- state payloads ------------------------------------------------------------------------

def test_update_state_up_to_date() -> None:
    payload = ha.update_payload(make_state(phase="done", last_result="succeeded"), None, None)
    validator("update_state").validate(payload)
    assert payload["installed_version"] == "6 (aaaaaaa)"
    assert payload["latest_version"] == payload["installed_version"]  # HA: "up to date"
    assert payload["in_progress"] is False and payload["update_percentage"] is None


def test_update_state_waiting_for_approval() -> None:
    state = make_state(phase="awaiting_approval", desired_generation=7, deployment_id="d-7")
    payload = ha.update_payload(state, make_prompt(kind="approval"), make_desired())
    validator("update_state").validate(payload)
    assert payload["latest_version"] == "7 (bbbbbbb)"
    assert payload["in_progress"] is False  # HA only offers Install when not in progress
    assert "rollout r-3" in payload["release_summary"]
    assert "action switch" in payload["release_summary"]
    assert "waiting for approval" in payload["release_summary"]


def test_update_state_in_progress_and_open_choices() -> None:
    state = make_state(phase="migrated", desired_generation=7, percent=62.4)
    payload = ha.update_payload(state, None, make_desired())
    validator("update_state").validate(payload)
    assert payload["in_progress"] is True and payload["update_percentage"] == 62
    waiting = ha.update_payload(make_state(phase="awaiting_choice", desired_generation=7,
                                           percent=40.0), make_prompt(), make_desired())
    assert waiting["in_progress"] is False and waiting["update_percentage"] is None
    assert "open choices: postgres.major-upgrade, nextcloud.apps" in waiting["release_summary"]


def test_update_state_summary_fits_home_assistant() -> None:
    state = make_state(phase="failed", message="x" * 1000, desired_generation=7)
    payload = ha.update_payload(state, None, None)
    validator("update_state").validate(payload)
    assert len(payload["release_summary"]) == 255
    assert payload["latest_version"] == "7"  # desired known only from HostState


def test_update_state_for_a_host_never_deployed() -> None:
    payload = ha.update_payload(HostState(host=HOST, updated_at=0), None, None)
    validator("update_state").validate(payload)
    assert payload["installed_version"] == payload["latest_version"] == "0"


def test_short_hash() -> None:
    assert ha.short_hash(SYSTEM_NEW) == "bbbbbbb"
    assert ha.short_hash("/srv/sim/system-3") == ha.short_hash("/srv/sim/system-3")
    assert ha.short_hash("/srv/sim/system-3") != ha.short_hash("/srv/sim/system-4")
    assert ha.short_hash(None) is None


def test_entity_state_messages_are_json_on_the_ha_topics(topics: Topics) -> None:
    msgs = dict(ha.entity_state_messages(topics, HOST, make_state(), make_prompt(),
                                         make_desired()))
    assert set(msgs) == {topics.ha_host(HOST, leaf) for leaf in ("update", "state", "prompt")}
    for payload in msgs.values():
        assert isinstance(json.loads(payload), dict)
    prompt_state = json.loads(msgs[topics.ha_host(HOST, "prompt")])
    assert prompt_state["prompt_id"] == "p-1"
    assert prompt_state["questions"]["postgres.major-upgrade"]["choices"][1] == {
        "id": "fresh", "label": "Start empty", "description": "drops all databases",
        "destructive": True}


# -- commands -------------------------------------------------------------------------------

@pytest.mark.parametrize(("leaf", "payload", "expected"), [
    ("update/install", b'{"action":"install"}', ha.Approve()),
    ("update/install", b'{"action": "install"}', ha.Approve()),
    ("update/install", b"install", None),
    ("update/install", b'{"action":"reboot"}', None),
    ("update/install", b"[1]", None),
    ("update/install", b"\xff\xfe", None),
    ("reboot/press", b'{"action":"reboot"}', ha.Reboot()),
    ("reboot/press", b"PRESS", None),
    ("prompt/answer", b'{"prompt_id":"p-1","key":"pg.x","choice":"migrate"}',
     ha.Answer("p-1", "pg.x", "migrate")),
    ("prompt/answer", b'{"prompt_id":"p-1","key":"pg.x"}', None),
    ("prompt/answer", b'{"prompt_id":"p-1","key":"pg.x","choice":1}', None),
    ("prompt/answer", b'{"prompt_id":"p-1","key":"pg.x","choice":"a b"}', None),
    ("prompt/answer", b'{"prompt_id":"p-1","key":"pg.x","choice":"a","by":"me"}', None),
    ("prompt/answer", b"{" * 5000, None),
    ("prompt", b'{"action":"install"}', None),  # our own state topic is no command
])
def test_parse_command(topics: Topics, leaf: str, payload: bytes, expected: Any,
                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert ha.parse_command(topics, HOST, topics.ha_host(HOST, leaf), payload) == expected
    if expected is None and leaf != "prompt":
        assert "ignoring" in caplog.text  # a refused command always says why


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    ("homeassistant/status", b"online", True),
    ("homeassistant/status", b"online\n", True),
    ("homeassistant/status", b"offline", False),
    ("homeassistant/statusx", b"online", False),
    ("other/status", b"online", False),
])
def test_should_reannounce(topics: Topics, topic: str, payload: bytes, expected: bool) -> None:
    assert ha.should_reannounce(topics, topic, payload) is expected


def test_answer_model() -> None:
    model = ha.answer_model(ha.Answer("p-1", "pg.x", "migrate"), HOST, 5.0)
    assert model.choices == {"pg.x": "migrate"} and model.answered_by == "homeassistant"


def test_subscriptions_cover_status_commands_and_own_selects(topics: Topics) -> None:
    subs = ha.subscriptions(topics, HOST)
    assert "homeassistant/status" in subs
    assert "homeassistant/select/flotilla_web-1/+/config" in subs
    for leaf in ("update/install", "reboot/press", "prompt/answer"):
        assert topics.ha_host(HOST, leaf) in subs


# -- the bridge, without a broker ------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    async def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent.append((topic, payload, retain))

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.sent]


async def test_bridge_publishes_only_changes_and_removes_closed_selects(topics: Topics) -> None:
    rec = Recorder()
    bridge = ha.HomeAssistantBridge(topics, HOST, rec, reboot_allowed=False)
    await bridge.update(make_state(), None)
    first = len(rec.sent)
    assert first == 3 and all(retain for _, _, retain in rec.sent)
    await bridge.update(make_state(), None)  # same facts: nothing new
    assert len(rec.sent) == first
    prompt = make_prompt()
    await bridge.update(make_state(phase="awaiting_choice"), prompt)
    select_topics = set(ha.prompt_select_messages(topics, HOST, prompt))
    assert select_topics <= set(rec.topics()[first:])
    mark = len(rec.sent)
    await bridge.update(make_state(phase="dumped"), None)
    removed = {t for t, p, _ in rec.sent[mark:] if p == b""}
    assert removed == select_topics


async def test_bridge_removes_stale_selects_from_an_earlier_run(topics: Topics) -> None:
    rec = Recorder()
    bridge = ha.HomeAssistantBridge(topics, HOST, rec)
    await bridge.update(make_state(), None)
    stale = topics.ha_discovery("select", HOST, "choice_old_12345678")
    assert await bridge.on_message(stale, b'{"name":"old"}') is None
    assert (stale, b"", True) in rec.sent
    # another host's selects are not ours to remove
    other = topics.ha_discovery("select", "web-2", "choice_old_12345678")
    assert await bridge.on_message(other, b"{}") is None
    assert all(t != other for t, _, _ in rec.sent)


async def test_bridge_reannounces_on_home_assistant_online(topics: Topics) -> None:
    rec = Recorder()
    bridge = ha.HomeAssistantBridge(topics, HOST, rec)
    await bridge.update(make_state(), None)
    await bridge.announce()
    n = len(rec.sent)
    assert await bridge.on_message("homeassistant/status", b"offline") is None
    assert len(rec.sent) == n
    assert await bridge.on_message("homeassistant/status", b"online") is None
    again = rec.topics()[n:]
    assert topics.ha_discovery("update", HOST, "system") in again
    assert topics.ha_host(HOST, "update") in again  # states are re-sent too


async def test_bridge_submit_and_run_coalesce_bursts(topics: Topics) -> None:
    """Reporter.listeners are synchronous: they submit, one task publishes the latest."""
    rec = Recorder()
    bridge = ha.HomeAssistantBridge(topics, HOST, rec)
    task = asyncio.create_task(bridge.run())
    try:
        for pct in range(0, 100, 10):  # a burst of progress between two loop turns
            bridge.submit_state(make_state(phase="migrated", desired_generation=7,
                                           percent=float(pct)))
        bridge.submit_prompt(make_prompt())
        for _ in range(50):
            await asyncio.sleep(0.01)
            if rec.sent:
                break
        await asyncio.sleep(0.05)
        updates = [json.loads(p) for t, p, _ in rec.sent if t == topics.ha_host(HOST, "update")]
        assert [u["update_percentage"] for u in updates] == [90]
        assert any(t.startswith("homeassistant/select/") for t in rec.topics())
        bridge.submit_prompt(None)
        await asyncio.sleep(0.05)
        assert json.loads(rec.sent[-1][1]) == ha.prompt_payload(None)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- end to end through a real broker ------------------------------------------------------

class FakeHomeAssistant:
    """A plain MQTT client that reads discovery and state and presses things (JSON only)."""

    def __init__(self, client: aiomqtt.Client, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.last: dict[str, bytes] = {}
        self.count: dict[str, int] = {}

    async def run(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            topic = str(m.topic)
            self.last[topic] = payload
            self.count[topic] = self.count.get(topic, 0) + 1

    async def wait(self, predicate: Any, what: str, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.02)
        raise AssertionError(f"Home Assistant never saw {what}")

    def config(self, component: str, obj: str) -> dict[str, Any] | None:
        payload = self.last.get(self.topics.ha_discovery(component, HOST, obj))
        return json.loads(payload) if payload else None


@contextlib.asynccontextmanager
async def agent_side(url: str, bridge_box: list[ha.HomeAssistantBridge], topics: Topics,
                     commands: asyncio.Queue[ha.HaCommand], reboot_allowed: bool = True
                     ) -> AsyncIterator[ha.HomeAssistantBridge]:
    """An MQTT client standing in for the agent: it only wires the bridge."""
    address = parse_broker_url(url)
    async with aiomqtt.Client(**address.client_kwargs(), identifier="agent",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        async def publish(topic: str, payload: bytes, retain: bool) -> None:
            await client.publish(topic, payload, qos=1, retain=retain)

        bridge = ha.HomeAssistantBridge(topics, HOST, publish, reboot_allowed=reboot_allowed)
        bridge_box.append(bridge)
        for topic in bridge.subscriptions():
            await client.subscribe(topic, qos=1)
        await client.publish(topics.online(HOST), b"online", qos=1, retain=True)

        async def loop() -> None:
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                cmd = await bridge.on_message(str(m.topic), payload)
                if cmd is not None:
                    commands.put_nowait(cmd)

        task = asyncio.create_task(loop())
        try:
            yield bridge
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_end_to_end_with_a_home_assistant_client(broker, topics: Topics) -> None:  # type: ignore[no-untyped-def]
    commands: asyncio.Queue[ha.HaCommand] = asyncio.Queue()
    address = parse_broker_url(broker.url)
    # a stale select from an earlier run of the agent, still retained at the broker
    stale = topics.ha_discovery("select", HOST, "choice_gone_0000abcd")
    async with aiomqtt.Client(**address.client_kwargs(), identifier="old-agent") as old:
        await old.publish(stale, b'{"name":"gone"}', qos=1, retain=True)

    async with aiomqtt.Client(**address.client_kwargs(), identifier="homeassistant",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        hass = FakeHomeAssistant(client, topics)
        await client.subscribe(f"{topics.ha_prefix}/#", qos=1)
        await client.subscribe(f"{topics.prefix}/host/{HOST}/#", qos=1)
        ha_task = asyncio.create_task(hass.run())
        box: list[ha.HomeAssistantBridge] = []
        try:
            async with agent_side(broker.url, box, topics, commands) as bridge:
                prompt = make_prompt()
                state = make_state(phase="awaiting_approval", desired_generation=7,
                                   deployment_id="d-7", rollout_id="r-3")
                await bridge.update(state, prompt, make_desired(
                    policy=DeployPolicy(approval="ask", reboot="ask")))
                await bridge.announce()

                # discovery arrives, valid, and points at JSON state HA can read
                update_cfg = await hass.wait(lambda: hass.config("update", "system"),
                                             "the update entity")
                validator("update").validate(update_cfg)
                update_state = json.loads(await hass.wait(
                    lambda: hass.last.get(update_cfg["state_topic"]), "update state"))
                validator("update_state").validate(update_state)
                assert update_state["latest_version"] != update_state["installed_version"]
                assert update_state["in_progress"] is False
                assert hass.last[topics.online(HOST)] == b"online"

                # the stale select from the earlier run is removed
                await hass.wait(lambda: hass.last.get(stale) == b"", "the stale select removed")

                # Home Assistant restarts: it says online, the agent re-announces
                before = hass.count[topics.ha_discovery("update", HOST, "system")]
                await client.publish(topics.ha_status(), b"online", qos=1)
                await hass.wait(lambda: hass.count[topics.ha_discovery("update", HOST, "system")]
                                > before, "a re-announcement")

                # install pressed on the update entity -> the waiting deploy is approved
                await client.publish(update_cfg["command_topic"],
                                     update_cfg["payload_install"].encode(), qos=1)
                assert await asyncio.wait_for(commands.get(), 10) == ha.Approve()

                # a select set to "fresh" -> an Answer for that item of that prompt
                obj = ha.select_object_id("postgres.major-upgrade")
                select_cfg = await hass.wait(lambda: hass.config("select", obj), "the select")
                validator("select").validate(select_cfg)
                payload = render(select_cfg["command_template"], value="fresh")
                await client.publish(select_cfg["command_topic"], payload.encode(), qos=1)
                assert await asyncio.wait_for(commands.get(), 10) == ha.Answer(
                    "p-1", "postgres.major-upgrade", "fresh")

                # the reboot button: available only once a reboot is pending
                button = await hass.wait(lambda: hass.config("button", "reboot"), "the button")
                gate = button["availability"][1]
                assert render(gate["value_template"], hass.last[gate["topic"]]) == "offline"
                await bridge.update(make_state(phase="awaiting_reboot", generation=7,
                                               system=SYSTEM_NEW, desired_generation=7,
                                               needs_reboot=True), None)
                await hass.wait(lambda: render(gate["value_template"], hass.last[gate["topic"]])
                                == "online", "the reboot button available")
                await client.publish(button["command_topic"], button["payload_press"].encode(),
                                     qos=1)
                assert await asyncio.wait_for(commands.get(), 10) == ha.Reboot()

                # the prompt closed above (prompt=None): its selects are gone
                await hass.wait(lambda: hass.last.get(topics.ha_discovery("select", HOST, obj))
                                == b"", "the select removed")
                done = json.loads(hass.last[topics.ha_host(HOST, "update")])
                assert done["installed_version"] == done["latest_version"] == "7 (bbbbbbb)"

                # garbage from "Home Assistant" changes nothing and crashes nothing
                await client.publish(update_cfg["command_topic"], b"\x00garbage", qos=1)
                await client.publish(select_cfg["command_topic"], b'{"key":1}', qos=1)
                await asyncio.sleep(0.3)
                assert commands.empty()
        finally:
            ha_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ha_task
