"""Home Assistant discovery (issue 6): schemas from HA's MQTT docs, state JSON, commands.

Every discovery payload is validated against tests/schemas/<component>.json. The
templates Home Assistant evaluates are rendered with Jinja's immutable sandbox (the
environment HA uses), so a template that reads the wrong key fails here, not in a
living room. The end-to-end tests run a real Home Assistant core
(tests/test_ha_real.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from referencing import Registry, Resource

from client.ask import homeassistant as ha
from protocol.models import Choice, DeployPolicy, Desired, HostState, Prompt, ReportItem
from protocol.topics import Topics

SCHEMAS = Path(__file__).parent / "schemas"
COMPONENTS = ("update", "binary_sensor", "sensor", "button", "select")
HOST = "web-1"
TOKEN = "tok_" + "x" * 40
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
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=False, prompt=None,
                                        token=TOKEN))
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
    msgs = ha.discovery_messages(topics, HOST, reboot_allowed=reboot_allowed, prompt=prompt,
                                  token=TOKEN)
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
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=False, prompt=None,
                                        token=TOKEN))
    config = json.loads(msgs[topics.ha_discovery("update", HOST, "system")])
    assert config["state_topic"] == topics.ha_host(HOST, "update")
    assert config["command_topic"] == topics.ha_host(HOST, "update/install")
    assert json.loads(config["payload_install"]) == {"action": "install", "token": TOKEN}
    # title and summary live in the state JSON: in a config they would freeze them
    assert "title" not in config and "release_summary" not in config


def test_reboot_button_is_unavailable_unless_a_reboot_may_be_taken(topics: Topics) -> None:
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=True, prompt=None,
                                        token=TOKEN))
    button = json.loads(msgs[topics.ha_discovery("button", HOST, "reboot")])
    assert button["availability_mode"] == "all"
    gate = button["availability"][1]
    assert gate["topic"] == topics.ha_host(HOST, "state")
    desired = make_desired(policy=DeployPolicy(reboot="ask"))
    reboot_prompt = make_prompt(kind="reboot")
    cases = [  # state, open prompt, desired, agent takes reboots from HA, button
        (make_state(needs_reboot=False), None, desired, True, "offline"),
        # the deployment ended ("later"): needs_reboot stays, nothing waits for a reboot
        (make_state(needs_reboot=True), None, desired, True, "offline"),
        (make_state(needs_reboot=True), None, None, True, "offline"),
        # the reboot prompt is open (ask, or a window not open yet): available
        (make_state(needs_reboot=False), reboot_prompt, desired, True, "online"),
        (make_state(needs_reboot=True), reboot_prompt, make_desired(), True, "online"),
        (make_state(needs_reboot=True), make_prompt(), desired, True, "offline"),
        # no --ha-reboot: never
        (make_state(needs_reboot=True), reboot_prompt, desired, False, "offline"),
        (make_state(needs_reboot=True), None, desired, False, "offline"),
    ]
    for state, prompt, d, allowed, expected in cases:
        payload = json.dumps(ha.state_payload(state, prompt, d, allowed))
        assert render(gate["value_template"], payload) == expected, (state, prompt, d, allowed)
    assert json.loads(button["payload_press"]) == {"action": "reboot", "token": TOKEN}


def test_prompt_selects(topics: Topics) -> None:
    prompt = make_prompt()
    selects = ha.prompt_select_messages(topics, HOST, prompt, TOKEN)
    by_key = {}
    for payload in selects.values():
        config = json.loads(payload)
        by_key[config["name"].removeprefix("Choice ")] = config
    assert set(by_key) == {"postgres.major-upgrade", "nextcloud.apps"}
    pg = by_key["postgres.major-upgrade"]
    assert pg["options"] == ["migrate", "fresh"]
    # what HA publishes when a person picks "fresh"
    command = json.loads(render(pg["command_template"], value="fresh"))
    assert command == {"prompt_id": "p-1", "key": "postgres.major-upgrade", "choice": "fresh",
                       "token": TOKEN}
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
        assert ha.prompt_select_messages(topics, HOST, prompt, TOKEN) == {}
    assert "fleet-agent prompt" in caplog.text


def test_sensor_templates_read_the_state_json(topics: Topics) -> None:
    msgs = dict(ha.discovery_messages(topics, HOST, reboot_allowed=False, prompt=None,
                                        token=TOKEN))
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
    # only approval offers Install: versions differ only then; every other wait (a
    # choice, a reboot) and every running phase (migrating too) is "in progress"
    for phase, prompt in [("awaiting_choice", make_prompt()), ("migrating", None),
                          ("awaiting_reboot", make_prompt(kind="reboot")), ("switched", None)]:
        waiting = ha.update_payload(make_state(phase=phase, desired_generation=7,
                                               percent=40.0), prompt, make_desired())
        assert waiting["in_progress"] is True, phase
        assert waiting["latest_version"] == waiting["installed_version"], phase
    waiting = ha.update_payload(make_state(phase="awaiting_choice", desired_generation=7),
                                make_prompt(), make_desired())
    assert "open choices: postgres.major-upgrade, nextcloud.apps" in waiting["release_summary"]


def test_update_state_summary_fits_home_assistant() -> None:
    state = make_state(phase="failed", message="x" * 1000, desired_generation=7)
    payload = ha.update_payload(state, None, None)
    validator("update_state").validate(payload)
    assert len(payload["release_summary"]) == 255
    # a failed deploy: nothing to Install (the summary says what happened)
    assert payload["latest_version"] == payload["installed_version"] == "6 (aaaaaaa)"


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

def _cmd(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(("leaf", "payload", "expected"), [
    ("update/install", _cmd(action="install", token=TOKEN), ha.Approve()),
    ("update/install", b'{"action": "install", "token": "' + TOKEN.encode() + b'"}',
     ha.Approve()),
    ("update/install", b'{"action":"install"}', None),                   # no token
    ("update/install", _cmd(action="install", token="tok_" + "y" * 40), None),  # not ours
    ("update/install", _cmd(action="install", token=7), None),
    ("update/install", _cmd(action="install", token=TOKEN, x=1), None),
    ("update/install", b"install", None),
    ("update/install", _cmd(action="reboot", token=TOKEN), None),
    ("update/install", b"[1]", None),
    ("update/install", b"\xff\xfe", None),
    ("reboot/press", _cmd(action="reboot", token=TOKEN), ha.Reboot()),
    ("reboot/press", b'{"action":"reboot"}', None),
    ("reboot/press", b"PRESS", None),
    ("prompt/answer", _cmd(prompt_id="p-1", key="pg.x", choice="migrate", token=TOKEN),
     ha.Answer("p-1", "pg.x", "migrate")),
    ("prompt/answer", _cmd(prompt_id="p-1", key="pg.x", choice="migrate"), None),
    ("prompt/answer", _cmd(prompt_id="p-1", key="pg.x", token=TOKEN), None),
    ("prompt/answer", _cmd(prompt_id="p-1", key="pg.x", choice=1, token=TOKEN), None),
    ("prompt/answer", _cmd(prompt_id="p-1", key="pg.x", choice="a b", token=TOKEN), None),
    ("prompt/answer", _cmd(prompt_id="p-1", key="pg.x", choice="a", by="me", token=TOKEN),
     None),
    ("prompt/answer", b"{" * 5000, None),
    ("prompt/answer", b"[" * 4000, None),                       # small, but nested too deep
    ("update/install", b'{"action":"install","token":"\\ud800"}', None),  # lone surrogate
    ("prompt", _cmd(action="install", token=TOKEN), None),  # our own state topic
])
def test_parse_command(topics: Topics, leaf: str, payload: bytes, expected: Any,
                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert ha.parse_command(topics, HOST, topics.ha_host(HOST, leaf), payload,
                                TOKEN) == expected
    if expected is None and leaf != "prompt":
        assert "ignoring" in caplog.text  # a refused command always says why
    assert TOKEN not in caplog.text  # nor does a log line show the token


REBOOT_PROMPT = Prompt(host=HOST, prompt_id="d-7.reboot", deployment_id="d-7", generation=7,
                       kind="reboot", created_at=0, items=[ReportItem(
                           step="deploy", id="reboot", severity="recommendation", message="m",
                           choices=[Choice(id="now"), Choice(id="later")])])
APPROVAL_PROMPT = make_prompt(prompt_id="d-7.approve", kind="approval")
NOW = ha.Answer("d-7.reboot", "deploy.reboot", "now")
LATER = ha.Answer("d-7.reboot", "deploy.reboot", "later")
PG = ha.Answer("p-1", "postgres.major-upgrade", "fresh")
AUTHORIZE = [  # command, open prompt, --ha-reboot, refused because (None: allowed)
    (ha.Reboot(), REBOOT_PROMPT, True, None),
    (ha.Reboot(), REBOOT_PROMPT, False, "--ha-reboot"),
    (ha.Reboot(), None, False, "--ha-reboot"),
    (NOW, REBOOT_PROMPT, True, None),
    (NOW, REBOOT_PROMPT, False, "--ha-reboot"),      # the reboot prompt's select: same gate
    (LATER, REBOOT_PROMPT, False, None),             # not rebooting is always allowed
    (ha.Approve(), APPROVAL_PROMPT, False, None),
    (ha.Approve(), make_prompt(), True, "waiting for approval"),   # Install is not "answer"
    (ha.Approve(), REBOOT_PROMPT, True, "waiting for approval"),   # ...nor "reboot"
    (ha.Approve(), None, True, "waiting for approval"),
    (PG, make_prompt(), False, None),
    (PG, None, False, "not open"),
    (ha.Answer("p-2", "postgres.major-upgrade", "fresh"), make_prompt(), False, "not open"),
    (ha.Answer("p-1", "nginx.note", "x"), make_prompt(), False, "not asked"),  # no choices
    (ha.Answer("p-1", "deploy.approve", "approve"), make_prompt(), False, "not asked"),
]


@pytest.mark.parametrize(("cmd", "prompt", "reboot_allowed", "refused"), AUTHORIZE)
def test_authorize(cmd: Any, prompt: Prompt | None, reboot_allowed: bool,
                   refused: str | None) -> None:
    why = ha.authorize(cmd, prompt, reboot_allowed=reboot_allowed)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_token_is_made_once_private_and_kept(tmp_path: Path) -> None:
    token = ha.load_token(tmp_path)
    path = tmp_path / ha.TOKEN_FILE
    assert ha.TOKEN_RE.fullmatch(token) and path.stat().st_mode & 0o777 == 0o600
    assert ha.load_token(tmp_path) == token  # persisted: HA's entities keep working
    path.write_text("short\n")  # damaged: a new one (the agent re-announces with it)
    again = ha.load_token(tmp_path)
    assert again != token and ha.TOKEN_RE.fullmatch(again)
    (tmp_path / "other").mkdir()
    assert ha.load_token(tmp_path / "other") != again  # every host its own


def test_token_never_reaches_entity_state(topics: Topics) -> None:
    """Templates (another host's entity's too) read states and attributes: no token."""
    for prompt in (None, make_prompt(), REBOOT_PROMPT):
        msgs = ha.entity_state_messages(topics, HOST, make_state(needs_reboot=True), prompt,
                                        make_desired(), {"postgres.major-upgrade": "fresh"},
                                        True)
        for _topic, payload in msgs:
            assert TOKEN.encode() not in payload
    configs = ha.discovery_messages(topics, HOST, reboot_allowed=True, prompt=make_prompt(),
                                    token=TOKEN)
    for _topic, payload in configs:
        if payload:
            config = json.loads(payload)
            assert TOKEN not in json.dumps(config["device"])


def test_reboot_question_gets_a_select_only_with_ha_reboot(topics: Topics) -> None:
    assert ha.prompt_select_messages(topics, HOST, REBOOT_PROMPT, TOKEN) == {}
    selects = ha.prompt_select_messages(topics, HOST, REBOOT_PROMPT, TOKEN,
                                        reboot_allowed=True)
    assert [json.loads(p)["options"] for p in selects.values()] == [["now", "later"]]


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
    bridge = ha.HomeAssistantBridge(topics, HOST, rec, TOKEN, reboot_allowed=False)
    await bridge.update(make_state(), None)
    first = len(rec.sent)
    assert first == 3 and all(retain for _, _, retain in rec.sent)
    await bridge.update(make_state(), None)  # same facts: nothing new
    assert len(rec.sent) == first
    prompt = make_prompt()
    await bridge.update(make_state(phase="awaiting_choice"), prompt)
    select_topics = set(ha.prompt_select_messages(topics, HOST, prompt, TOKEN))
    assert select_topics <= set(rec.topics()[first:])
    mark = len(rec.sent)
    await bridge.update(make_state(phase="dumped"), None)
    removed = {t for t, p, _ in rec.sent[mark:] if p == b""}
    assert removed == select_topics


async def test_bridge_removes_stale_selects_from_an_earlier_run(topics: Topics) -> None:
    rec = Recorder()
    bridge = ha.HomeAssistantBridge(topics, HOST, rec, TOKEN)
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
    bridge = ha.HomeAssistantBridge(topics, HOST, rec, TOKEN)
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
    bridge = ha.HomeAssistantBridge(topics, HOST, rec, TOKEN)
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
