"""Home Assistant MQTT discovery for one host: what to announce, what to report, what HA asks.

Everything here is JSON (Home Assistant does not speak msgpack) and, except for the
small `HomeAssistantBridge`, pure: facts in, `(topic, payload)` pairs or typed
commands out. The agent owns the MQTT session; the bridge only needs a `publish`
coroutine, so it can be tested against a real broker without an agent.

Topics (prefix `fleet/v1`, discovery prefix `homeassistant`, both configurable):

- `homeassistant/<component>/flotilla_<host>/<object>/config`  discovery, retained
- `fleet/v1/host/<host>/ha/update`   update-entity JSON (only the keys HA accepts there)
- `fleet/v1/host/<host>/ha/state`    phase, last result, reboot flags (JSON)
- `fleet/v1/host/<host>/ha/prompt`   the open prompt's questions (JSON)
- `fleet/v1/host/<host>/ha/update/install`  HA -> agent: approve the waiting deploy
- `fleet/v1/host/<host>/ha/reboot/press`    HA -> agent: reboot now
- `fleet/v1/host/<host>/ha/prompt/answer`   HA -> agent: one select's choice

Design choices (see docs-homeassistant.md):

- The reboot button is announced once (when the agent's configuration allows reboots
  from Home Assistant at all) and is *unavailable* unless a deployment waits on its
  reboot prompt: its availability has two topics (`online` and the JSON
  `reboot_available` flag) with `availability_mode: all`. A stable entity keeps
  automations and dashboards working; a button that comes and goes would not.
- Prompt selects are dynamic: one per open item with choices, removed with an empty
  retained config when the prompt closes, because choices differ per prompt.
- Every command carries the host's Home Assistant token (`STATE_DIR/ha-token`, made
  once, 0600): the agent puts it into its own discovery configs (`payload_install`,
  `payload_press`, the selects' `command_template`) and refuses a command without it.
  Under the shipped ACL no other host can read this host's discovery, so an entity that
  another host announces with this host's `command_topic` commands nothing. The token
  never appears in an entity's state or attributes (templates can read those).
- What a command may do is the agent's own configuration, not Home Assistant's: reboots
  only with `--ha-reboot` (the button, and the reboot prompt's select), Install only
  while an approval waits, answers only to the open prompt (`authorize`).
- The connectivity sensor reads the `online` topic itself and has no availability:
  with availability on the same topic it would turn "unavailable" instead of "off"
  exactly when it matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from protocol import prompts as P
from protocol.models import (
    Answer as AnswerModel,
)
from protocol.models import (
    Desired,
    HostPhase,
    HostState,
    Prompt,
    ReportItem,
)
from protocol.outcomes import AGENT_RESULTS, result_of_phase
from protocol.topics import Topics, validate_host

log = logging.getLogger(__name__)

MANUFACTURER = "Flotilla"
MODEL = "NixOS host (fleet-agent)"
ORIGIN_NAME = "flotilla"
SUPPORT_URL = "https://github.com/flotilla/flotilla"
TOKEN_FILE = "ha-token"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
RELEASE_SUMMARY_MAX = 255  # Home Assistant cuts the summary here
PHASES: tuple[str, ...] = get_args(HostPhase)
RESULTS: tuple[str, ...] = (*sorted(AGENT_RESULTS), "none")
SAFE_KEY = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")
SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
STORE_HASH = re.compile(r"^/nix/store/([0-9a-z]{32})-")
MAX_COMMAND_BYTES = 4096

Publish = Callable[[str, bytes, bool], Awaitable[None]]
Message = tuple[str, bytes]


# -- the host's Home Assistant token ------------------------------------------------------

def load_token(state_dir: Path) -> str:
    """The host's token for Home Assistant commands: read, or made once (0600)."""
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if TOKEN_RE.fullmatch(token):
        return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


def install_payload(token: str) -> str:
    return _dumps({"action": "install", "token": token}).decode()


def reboot_payload(token: str) -> str:
    return _dumps({"action": "reboot", "token": token}).decode()


# -- commands from Home Assistant ------------------------------------------------------

@dataclass(frozen=True)
class Approve:
    """The update entity's install was pressed: approve the deploy waiting for approval."""


@dataclass(frozen=True)
class Answer:
    """A prompt select was set: choose `choice` for item `key` ("STEP.ITEM")."""

    prompt_id: str
    key: str
    choice: str


@dataclass(frozen=True)
class Reboot:
    """The reboot button was pressed. The agent must re-check policy before acting."""


@dataclass(frozen=True)
class Reannounce:
    """Home Assistant (re)started: publish every discovery config again."""


HaCommand = Approve | Answer | Reboot | Reannounce


# -- topics ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HaTopics:
    """The JSON topics of one host's Home Assistant entities."""

    update: str
    state: str
    prompt: str
    install: str
    reboot: str
    answer: str
    online: str
    status: str
    select_configs: str

    @classmethod
    def of(cls, topics: Topics, host: str) -> HaTopics:
        host = validate_host(host)
        return cls(
            update=topics.ha_host(host, "update"),
            state=topics.ha_host(host, "state"),
            prompt=topics.ha_host(host, "prompt"),
            install=topics.ha_host(host, "update/install"),
            reboot=topics.ha_host(host, "reboot/press"),
            answer=topics.ha_host(host, "prompt/answer"),
            online=topics.online(host),
            status=topics.ha_status(),
            select_configs=f"{topics.ha_prefix}/select/flotilla_{host}/+/config",
        )


def subscriptions(topics: Topics, host: str) -> list[str]:
    """Topics the agent must subscribe to for the bridge (status, commands, own selects)."""
    t = HaTopics.of(topics, host)
    return [t.status, t.install, t.reboot, t.answer, t.select_configs]


# -- discovery ---------------------------------------------------------------------------

def _slug(host: str) -> str:
    return host.replace("-", "_")


def _agent_version() -> str:
    try:
        from importlib.metadata import version
        return version("flotilla")
    except Exception:  # not installed as a distribution (running from a checkout)
        return "0+unknown"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def device_block(host: str, sw_version: str | None = None) -> dict[str, Any]:
    return {
        "identifiers": [f"flotilla_{host}"],
        "name": host,
        "manufacturer": MANUFACTURER,
        "model": MODEL,
        "sw_version": sw_version or f"fleet-agent {_agent_version()}",
    }


def select_object_id(key: str) -> str:
    """Object id for a prompt item: readable slug plus a hash so `a.b_c` != `a_b.c`."""
    slug = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")[:40] or "item"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"choice_{slug}_{digest}"


def _entity(topics: Topics, host: str, component: str, object_id: str, name: str | None,
            sw_version: str | None, *, available_when_online: bool = True) -> dict[str, Any]:
    """Keys every entity shares: identity, device, origin, availability."""
    config: dict[str, Any] = {
        "name": name,
        "unique_id": f"flotilla_{host}_{object_id}",
        "default_entity_id": f"{component}.flotilla_{_slug(host)}_{object_id}",
        "device": device_block(host, sw_version),
        "origin": {"name": ORIGIN_NAME, "sw_version": _agent_version(),
                   "support_url": SUPPORT_URL},
    }
    if available_when_online:
        config["availability"] = [{"topic": topics.online(host), "payload_available": "online",
                                   "payload_not_available": "offline"}]
    return config


def _jinja_str(value: str) -> str:
    """A Jinja string literal (JSON escaping is a subset Jinja reads back the same)."""
    return json.dumps(value)


def _select_config(topics: Topics, host: str, prompt: Prompt, item: ReportItem,
                   sw_version: str | None, token: str) -> dict[str, Any]:
    t = HaTopics.of(topics, host)
    key = item.key
    lit = _jinja_str(key)
    config = _entity(topics, host, "select", select_object_id(key), f"Choice {key}", sw_version)
    command = ('{"prompt_id":' + json.dumps(prompt.prompt_id) + ',"key":' + json.dumps(key)
               + ',"choice":"{{ value }}","token":' + json.dumps(token) + '}')
    config.update({
        "icon": "mdi:help-rhombus",
        "options": [c.id for c in item.choices],
        "command_topic": t.answer,
        "command_template": command,
        "state_topic": t.prompt,
        "value_template": "{{ value_json.answers.get(" + lit + ") or 'None' }}",
        "json_attributes_topic": t.prompt,
        "json_attributes_template": "{{ value_json.questions.get(" + lit + ", {}) | tojson }}",
    })
    return config


def _answerable(item: ReportItem) -> bool:
    return bool(item.choices) and SAFE_KEY.fullmatch(item.key) is not None and all(
        SAFE_ID.fullmatch(c.id) for c in item.choices)


def prompt_select_messages(topics: Topics, host: str, prompt: Prompt | None, token: str,
                           sw_version: str | None = None, *, reboot_allowed: bool = False
                           ) -> dict[str, bytes]:
    """Discovery config per answerable item of the open prompt, keyed by config topic.

    The reboot question gets a select only when reboots from Home Assistant are allowed."""
    out: dict[str, bytes] = {}
    if prompt is None:
        return out
    for item in prompt.items:
        if not item.choices or (item.key == P.REBOOT_KEY and not reboot_allowed):
            continue
        if not _answerable(item):
            log.warning("%s: prompt item %r has characters Home Assistant cannot carry;"
                        " answer it with `fleet-agent prompt`", host, item.key)
            continue
        topic = topics.ha_discovery("select", host, select_object_id(item.key))
        out[topic] = _dumps(_select_config(topics, host, prompt, item, sw_version, token))
    return out


def discovery_messages(topics: Topics, host: str, *, reboot_allowed: bool,
                       prompt: Prompt | None, token: str,
                       sw_version: str | None = None) -> list[Message]:
    """Every retained discovery config for the host; an empty payload removes an entity.

    The reboot button is removed (empty config) when reboots from Home Assistant are
    not allowed, so turning the option off also cleans up an earlier announcement.
    Selects of a prompt that closed are not known here: `HomeAssistantBridge` removes them.
    """
    t = HaTopics.of(topics, host)
    msgs: list[Message] = []

    update = _entity(topics, host, "update", "system", "System", sw_version)
    update.update({
        "icon": "mdi:nix",
        "state_topic": t.update,
        "command_topic": t.install,
        "payload_install": install_payload(token),
    })
    msgs.append((topics.ha_discovery("update", host, "system"), _dumps(update)))

    online = _entity(topics, host, "binary_sensor", "online", "Online", sw_version,
                     available_when_online=False)
    online.update({
        "device_class": "connectivity",
        "state_topic": t.online,
        "payload_on": "online",
        "payload_off": "offline",
        "entity_category": "diagnostic",
    })
    msgs.append((topics.ha_discovery("binary_sensor", host, "online"), _dumps(online)))

    phase = _entity(topics, host, "sensor", "phase", "Phase", sw_version)
    phase.update({
        "device_class": "enum",
        "options": list(PHASES),
        "state_topic": t.state,
        "value_template": "{{ value_json.phase }}",
        "json_attributes_topic": t.state,
        "icon": "mdi:progress-wrench",
    })
    msgs.append((topics.ha_discovery("sensor", host, "phase"), _dumps(phase)))

    result = _entity(topics, host, "sensor", "last_result", "Last result", sw_version)
    result.update({
        "device_class": "enum",
        "options": list(RESULTS),
        "state_topic": t.state,
        "value_template": "{{ value_json.last_result }}",
        "icon": "mdi:clipboard-check-outline",
    })
    msgs.append((topics.ha_discovery("sensor", host, "last_result"), _dumps(result)))

    reboot_flag = _entity(topics, host, "binary_sensor", "needs_reboot", "Needs reboot",
                          sw_version)
    reboot_flag.update({
        "state_topic": t.state,
        "value_template": "{{ 'ON' if value_json.needs_reboot else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "icon": "mdi:restart-alert",
    })
    msgs.append((topics.ha_discovery("binary_sensor", host, "needs_reboot"), _dumps(reboot_flag)))

    button_topic = topics.ha_discovery("button", host, "reboot")
    if reboot_allowed:
        button = _entity(topics, host, "button", "reboot", "Reboot", sw_version)
        button["availability"].append({
            "topic": t.state,
            "value_template": "{{ 'online' if value_json.reboot_available else 'offline' }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        })
        button.update({
            "availability_mode": "all",
            "device_class": "restart",
            "command_topic": t.reboot,
            "payload_press": reboot_payload(token),
        })
        msgs.append((button_topic, _dumps(button)))
    else:
        msgs.append((button_topic, b""))

    msgs.extend(prompt_select_messages(topics, host, prompt, token, sw_version,
                                       reboot_allowed=reboot_allowed).items())
    return msgs


# -- state -------------------------------------------------------------------------------

def short_hash(system: str | None) -> str | None:
    """7 characters naming a system: the store hash of a Nix path, else a digest of it."""
    if not system:
        return None
    m = STORE_HASH.match(system)
    if m:
        return m.group(1)[:7]
    return hashlib.sha256(system.encode()).hexdigest()[:7]


def _version(generation: int, system: str | None) -> str:
    h = short_hash(system)
    return f"{generation} ({h})" if h else str(generation)


def _desired_fields(desired: Desired | Mapping[str, Any] | None) -> dict[str, Any]:
    if desired is None:
        return {}
    if isinstance(desired, Desired):
        return desired.model_dump(mode="json", exclude={"signature"})
    return dict(desired)


def reboot_available(state: HostState, prompt: Prompt | None,
                     desired: Desired | Mapping[str, Any] | None, reboot_allowed: bool) -> bool:
    """The Reboot button may be pressed: the agent takes reboots from Home Assistant and
    a reboot is pending, i.e. the deployment waits on its reboot prompt (policy `ask`,
    or a reboot window not open yet). Pressing it answers that prompt with "now". Once
    the deployment ended ("later"), `needs_reboot` stays on but no deployment waits for
    a reboot, so the button is unavailable rather than pressable for nothing."""
    return reboot_allowed and prompt is not None and prompt.kind == "reboot"


def awaiting_approval(state: HostState, prompt: Prompt | None) -> bool:
    return state.phase == "awaiting_approval" or (prompt is not None
                                                 and prompt.kind == "approval")


def in_progress(state: HostState, prompt: Prompt | None) -> bool:
    """Home Assistant's `in_progress`: a deploy runs or waits for anything but approval
    (a choice, a reboot); HA then refuses Install, which only means "approve"."""
    at_rest = state.phase == "idle" or result_of_phase(state.phase) is not None
    return not at_rest and not awaiting_approval(state, prompt)


def _prompt_summary(prompt: Prompt | None, state: HostState) -> str:
    if awaiting_approval(state, prompt):
        return "waiting for approval (press Install)"
    if prompt is None:
        return ""
    keys = [i.key for i in prompt.items if i.choices]
    if not keys:
        return f"open prompt {prompt.prompt_id}"
    return "open choices: " + ", ".join(keys)


def update_payload(state: HostState, prompt: Prompt | None,
                   desired: Desired | Mapping[str, Any] | None) -> dict[str, Any]:
    """The update entity's JSON: only the keys Home Assistant's schema accepts there.

    Home Assistant drops the whole message on an unknown key or a null string, so
    every string is present and non-null; only `update_percentage` may be null.
    Install means "approve", so Home Assistant is shown a newer `latest_version` (which
    is when it offers Install) only while an approval waits; otherwise the installed
    version, with what is going on in the summary. `in_progress` (and the percentage)
    follow the deploy for Home Assistant versions that read them (2024.3 ignores both).
    """
    d = _desired_fields(desired)
    installed = _version(state.generation, state.system)
    d_gen = int(d.get("generation") or 0)
    desired_gen = max(d_gen, state.desired_generation)
    running = in_progress(state, prompt)
    if desired_gen > state.generation and awaiting_approval(state, prompt):
        latest = _version(desired_gen, d.get("system") if d_gen == desired_gen else None)
    else:
        latest = installed  # equal strings: HA shows "up to date" and offers no Install
    percent = state.percent if running and state.percent is not None else None
    parts = []
    rollout = d.get("rollout_id") or state.rollout_id
    if rollout:
        parts.append(f"rollout {rollout}")
    if d.get("deployment_id") or state.deployment_id:
        parts.append(f"deployment {d.get('deployment_id') or state.deployment_id}")
    if d.get("action"):
        parts.append(f"action {d['action']}")
    if state.last_result and not running:
        parts.append(f"last result {state.last_result}")
    summary = _prompt_summary(prompt, state)
    if summary:
        parts.append(summary)
    if state.message:
        parts.append(state.message)
    return {
        "installed_version": installed,
        "latest_version": latest,
        "title": f"NixOS system of {state.host}",
        "release_summary": "; ".join(parts)[:RELEASE_SUMMARY_MAX],
        "in_progress": running,
        "update_percentage": None if percent is None else round(max(0.0, min(100.0, percent))),
    }


def state_payload(state: HostState, prompt: Prompt | None,
                  desired: Desired | Mapping[str, Any] | None,
                  reboot_allowed: bool = False) -> dict[str, Any]:
    """Sensors' JSON (also the phase sensor's attributes)."""
    return {
        "phase": state.phase,
        "last_result": state.last_result or "none",
        "needs_reboot": state.needs_reboot,
        "reboot_available": reboot_available(state, prompt, desired, reboot_allowed),
        "generation": state.generation,
        "desired_generation": state.desired_generation,
        "system": state.system,
        "deployment_id": state.deployment_id,
        "rollout_id": state.rollout_id,
        "step": state.step,
        "percent": state.percent,
        "message": state.message,
        "open_prompt": prompt.prompt_id if prompt is not None else None,
        "updated_at": state.updated_at,
    }


def prompt_payload(prompt: Prompt | None,
                   answered: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The open prompt for selects: state (answers) and attributes (questions)."""
    if prompt is None:
        return {"prompt_id": None, "kind": None, "deadline": None, "questions": {},
                "answers": {}}
    questions = {
        item.key: {
            "step": item.step,
            "id": item.id,
            "severity": item.severity,
            "message": item.message,
            "default": item.default,
            "deadline": prompt.deadline,
            "choices": [{"id": c.id, "label": c.label or c.id, "description": c.description,
                         "destructive": c.destructive} for c in item.choices],
            "destructive_choices": [c.id for c in item.choices if c.destructive],
        }
        for item in prompt.items
    }
    return {
        "prompt_id": prompt.prompt_id,
        "deployment_id": prompt.deployment_id,
        "kind": prompt.kind,
        "deadline": prompt.deadline,
        "questions": questions,
        "answers": dict(answered or {}),
    }


def entity_state_messages(topics: Topics, host: str, state: HostState, prompt: Prompt | None,
                          desired: Desired | Mapping[str, Any] | None,
                          answered: Mapping[str, str] | None = None,
                          reboot_allowed: bool = False) -> list[Message]:
    """Retained JSON state of every entity (update, sensors, selects)."""
    t = HaTopics.of(topics, host)
    return [
        (t.update, _dumps(update_payload(state, prompt, desired))),
        (t.state, _dumps(state_payload(state, prompt, desired, reboot_allowed))),
        (t.prompt, _dumps(prompt_payload(prompt, answered))),
    ]


# -- commands ----------------------------------------------------------------------------

def should_reannounce(topics: Topics, topic: str, payload: bytes) -> bool:
    """Home Assistant announces its (re)start with `online` on its status topic."""
    return topic == topics.ha_status() and payload.strip() == b"online"


def _json_object(payload: bytes, what: str) -> dict[str, Any] | None:
    if len(payload) > MAX_COMMAND_BYTES:
        log.warning("ignoring %s from Home Assistant: payload of %d bytes is too large",
                    what, len(payload))
        return None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("ignoring %s from Home Assistant: not JSON (%s)", what, exc)
        return None
    except RecursionError:  # a few KB of '[' nest deeper than the decoder goes
        log.warning("ignoring %s from Home Assistant: JSON nested too deep", what)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s from Home Assistant: expected a JSON object", what)
        return None
    return data


def _token_ok(data: dict[str, Any], token: str, what: str) -> bool:
    given = data.get("token")
    # only a token's own characters (ASCII) are compared: a lone surrogate cannot encode
    if (isinstance(given, str) and TOKEN_RE.fullmatch(given)
            and hmac.compare_digest(given.encode(), token.encode())):
        return True
    log.warning("ignoring %s from Home Assistant: missing or wrong token (not from this"
                " host's own discovery)", what)
    return False


def _exact(data: dict[str, Any], keys: set[str], what: str) -> bool:
    if set(data) == keys:
        return True
    log.warning("ignoring %s from Home Assistant: keys must be %s; got %s", what,
                ", ".join(sorted(keys)), _clip(sorted(data)))
    return False


def _clip(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_command(topics: Topics, host: str, topic: str, payload: bytes, token: str
                  ) -> HaCommand | None:
    """Typed command for a message on one of the bridge's topics; None (logged) otherwise.

    Install, reboot and answers must carry `token`, which only this host's own discovery
    announced: a command from an entity someone else announced is refused here."""
    t = HaTopics.of(topics, host)
    if topic == t.status:
        return Reannounce() if should_reannounce(topics, topic, payload) else None
    leaf = {t.install: "install", t.reboot: "reboot", t.answer: "answer"}.get(topic)
    if leaf is None:
        log.debug("%s: not a Home Assistant command topic: %s", host, topic)
        return None
    data = _json_object(payload, leaf)
    if data is None or not _token_ok(data, token, leaf):
        return None
    if leaf in ("install", "reboot"):
        if not _exact(data, {"action", "token"}, leaf) or data["action"] != leaf:
            if set(data) == {"action", "token"}:
                log.warning("ignoring %s from Home Assistant: action must be %r, got %s",
                            leaf, leaf, _clip(data["action"]))
            return None
        return Approve() if leaf == "install" else Reboot()
    if not _exact(data, {"prompt_id", "key", "choice", "token"}, leaf):
        return None
    prompt_id, key, choice = data["prompt_id"], data["key"], data["choice"]
    if not all(isinstance(v, str) for v in (prompt_id, key, choice)):
        log.warning("ignoring answer from Home Assistant: values must be strings")
        return None
    if not (SAFE_ID.fullmatch(prompt_id) and SAFE_KEY.fullmatch(key)
            and SAFE_ID.fullmatch(choice)):
        log.warning("ignoring answer from Home Assistant: invalid prompt id, key or choice"
                    " %s", _clip({k: data[k] for k in ("prompt_id", "key", "choice")}))
        return None
    return Answer(prompt_id=prompt_id, key=key, choice=choice)


def authorize(cmd: Approve | Answer | Reboot, prompt: Prompt | None, *, reboot_allowed: bool
              ) -> str | None:
    """Why the agent's own configuration refuses a (token-checked) command; None if it
    may go on to the prompt's own checks. Pure, like `client.receive.decide.admit`."""
    reboot = isinstance(cmd, Reboot) or (isinstance(cmd, Answer) and cmd.key == P.REBOOT_KEY
                                         and cmd.choice == P.REBOOT_NOW)
    if reboot and not reboot_allowed:
        return ("this agent does not take reboots from Home Assistant (start it with"
                " --ha-reboot)")
    if isinstance(cmd, Approve) and (prompt is None or prompt.kind != "approval"):
        return "Install means approve, and no deployment is waiting for approval"
    if isinstance(cmd, Answer):
        if prompt is None or prompt.prompt_id != cmd.prompt_id:
            return f"prompt {cmd.prompt_id} is not open"
        if cmd.key not in {i.key for i in prompt.items if i.choices}:
            return f"{cmd.key} is not asked in prompt {cmd.prompt_id}"
    return None


def answer_model(cmd: Answer, host: str, now: float,
                 answered_by: str = "homeassistant") -> AnswerModel:
    """The protocol Answer for a select choice (unsigned: it came over the local ACL)."""
    return AnswerModel(host=host, prompt_id=cmd.prompt_id, choices={cmd.key: cmd.choice},
                       answered_by=answered_by, issued_at=now)


# -- the publisher ------------------------------------------------------------------------

class HomeAssistantBridge:
    """Publishes discovery and state for one host and turns HA's messages into commands.

    Keeps the last payload per topic so repeated HostState updates (progress ticks)
    only publish what changed, and the set of select configs out there so closed
    prompts' selects are removed, including stale ones left by an earlier run (seen
    through the subscription to this host's own select configs).
    """

    def __init__(self, topics: Topics, host: str, publish: Publish, token: str, *,
                 reboot_allowed: bool = False, sw_version: str | None = None) -> None:
        self.topics = topics
        self.host = validate_host(host)
        self.t = HaTopics.of(topics, host)
        self._publish = publish
        self.token = token
        self.reboot_allowed = reboot_allowed
        self.sw_version = sw_version
        self.state: HostState | None = None
        self.prompt: Prompt | None = None
        self.desired: Desired | Mapping[str, Any] | None = None
        self.answered: dict[str, str] = {}
        self._sent: dict[str, bytes] = {}
        self._selects: set[str] = set()  # select config topics that may exist at the broker
        self._lock = asyncio.Lock()  # one publisher at a time keeps retained state ordered
        self._dirty = asyncio.Event()

    def subscriptions(self) -> list[str]:
        return subscriptions(self.topics, self.host)

    async def _send(self, topic: str, payload: bytes, *, force: bool = False) -> None:
        if not force and self._sent.get(topic) == payload:
            return
        await self._publish(topic, payload, True)
        self._sent[topic] = payload

    # Synchronous hand-off for callers that cannot await (Reporter.listeners): the
    # latest facts win and `run()` publishes them, so bursts of progress coalesce.
    def submit_state(self, state: HostState) -> None:
        self.state = state
        self._dirty.set()

    def submit_prompt(self, prompt: Prompt | None,
                      answered: Mapping[str, str] | None = None) -> None:
        if prompt is None or self.prompt is None or prompt.prompt_id != self.prompt.prompt_id:
            self.answered = {}
        if answered is not None:
            self.answered = dict(answered)
        self.prompt = prompt
        self._dirty.set()

    def submit_desired(self, desired: Desired | Mapping[str, Any] | None) -> None:
        self.desired = desired
        self._dirty.set()

    async def run(self) -> None:
        """Publish whatever was submitted, until cancelled (run it in the agent's TaskGroup)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self.state is not None:
                await self.update(self.state, self.prompt, self.desired, self.answered)

    async def announce(self) -> None:
        """Publish every discovery config (forced: HA may have lost them) and the state."""
        async with self._lock:
            await self._announce()

    async def _announce(self) -> None:
        current = self._selects_for(self.prompt)
        for topic, payload in discovery_messages(self.topics, self.host,
                                                 reboot_allowed=self.reboot_allowed,
                                                 prompt=self.prompt, token=self.token,
                                                 sw_version=self.sw_version):
            await self._send(topic, payload, force=True)
        await self._remove_selects(set(current))
        self._selects = set(current)
        await self._publish_state(force=True)

    async def update(self, state: HostState, prompt: Prompt | None,
                     desired: Desired | Mapping[str, Any] | None = None,
                     answered: Mapping[str, str] | None = None) -> None:
        """New HostState and/or prompt: selects in or out, then the JSON state."""
        async with self._lock:
            await self._update(state, prompt, desired, answered)

    async def _update(self, state: HostState, prompt: Prompt | None,
                      desired: Desired | Mapping[str, Any] | None,
                      answered: Mapping[str, str] | None) -> None:
        if prompt is None or self.prompt is None or prompt.prompt_id != self.prompt.prompt_id:
            self.answered = {}
        if answered is not None:
            self.answered = dict(answered)
        self.state, self.prompt = state, prompt
        if desired is not None:
            self.desired = desired
        current = self._selects_for(prompt)
        for topic, payload in current.items():
            await self._send(topic, payload)
        await self._remove_selects(set(current))
        self._selects = set(current)
        await self._publish_state()

    async def _remove_selects(self, keep: set[str]) -> None:
        for topic in sorted(self._selects - keep):
            await self._send(topic, b"", force=True)

    async def _publish_state(self, force: bool = False) -> None:
        if self.state is None:
            return
        for topic, payload in entity_state_messages(self.topics, self.host, self.state,
                                                    self.prompt, self.desired, self.answered,
                                                    self.reboot_allowed):
            await self._send(topic, payload, force=force)

    def handle(self, topic: str, payload: bytes) -> HaCommand | None:
        """Command for an incoming message; remembers select configs seen at the broker."""
        if self._is_own_select_config(topic):
            if payload:
                self._selects.add(topic)
            return None
        return parse_command(self.topics, self.host, topic, payload, self.token)

    async def on_message(self, topic: str, payload: bytes) -> HaCommand | None:
        """`handle`, plus the bridge's own follow-ups (re-announce, stale select removal).

        Returns only what the agent must act on: Approve, Answer or Reboot.
        """
        cmd = self.handle(topic, payload)
        if isinstance(cmd, Reannounce):
            await self.announce()
            return None
        if self._is_own_select_config(topic) and payload and self.state is not None:
            async with self._lock:
                if topic not in self._selects_for(self.prompt):
                    log.info("%s: removing stale Home Assistant select %s", self.host, topic)
                    await self._send(topic, b"", force=True)
                    self._selects.discard(topic)
        return cmd

    def _selects_for(self, prompt: Prompt | None) -> dict[str, bytes]:
        return prompt_select_messages(self.topics, self.host, prompt, self.token,
                                      self.sw_version, reboot_allowed=self.reboot_allowed)

    def _is_own_select_config(self, topic: str) -> bool:
        head = f"{self.topics.ha_prefix}/select/flotilla_{self.host}/"
        return topic.startswith(head) and topic.endswith("/config") and topic.count("/") == 4 + (
            self.topics.ha_prefix.count("/"))
