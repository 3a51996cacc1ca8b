"""Every MQTT topic Flotilla uses, built in one place.

Host names are validated here so that no caller can build a topic that escapes a
host's subtree (`+`, `#`, `/` are not valid host-name characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from protocol.errors import InputError

HOST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_PREFIX = "fleet/v1"
HostTopicKind = Literal["desired", "answer", "events", "prompt", "state", "online", "confirm"]
HOST_TOPIC_KINDS: tuple[HostTopicKind, ...] = (
    "desired", "answer", "events", "prompt", "state", "online", "confirm",
)


def validate_host(name: str) -> str:
    """Return `name` if it is a valid host name, else raise InputError."""
    if not isinstance(name, str) or not HOST_NAME_RE.fullmatch(name):
        raise InputError(
            f"invalid host name {name!r}: use 1-63 of a-z, 0-9 and '-', starting with a"
            " letter or digit"
        )
    return name


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be a topic prefix, or None. Refused: the MQTT wildcards `+`
    and `#`, a leading `$` (broker-internal topics), empty levels (`a//b`, a leading or
    trailing `/`), and what works on Mosquitto only: `.` or white space (NATS maps `/`
    to `.` and disconnects a client whose topic holds either) and a level that is `*`
    or `>` (NATS wildcards: a subscription would match other prefixes' topics)."""
    if not prefix:
        return "it is empty"
    if prefix.startswith("$"):
        return "it starts with '$' (reserved for broker topics)"
    if any(c in prefix for c in "+#"):
        return "it holds an MQTT wildcard ('+' or '#')"
    if "" in prefix.split("/"):
        return "it has an empty level (a leading, trailing or doubled '/')"
    if any(level in ("*", ">") for level in prefix.split("/")):
        return "it has a level '*' or '>' (a NATS wildcard: it would match other topics)"
    if "." in prefix:
        return "it holds '.' (NATS maps topic levels to '.'-separated subjects)"
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in prefix):
        return "it holds white space or a control character"
    return None


def _validate_prefix(prefix: str, what: str = "topic prefix", example: str = "fleet/v1"
                     ) -> str:
    problem = prefix_problem(prefix) if isinstance(prefix, str) else "it is not a string"
    if problem is not None:
        raise InputError(f"invalid {what} {prefix!r}: {problem}; use levels of letters, "
                         f"digits, '-' and '_' separated by '/' (e.g. {example})")
    return prefix


@dataclass(frozen=True)
class Topics:
    """Topic builder for one prefix (default `fleet/v1`)."""

    prefix: str = DEFAULT_PREFIX
    ha_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        _validate_prefix(self.prefix)
        _validate_prefix(self.ha_prefix, "Home Assistant discovery prefix (--ha-prefix)",
                         "homeassistant")

    def host(self, host: str, kind: HostTopicKind) -> str:
        return f"{self.prefix}/host/{validate_host(host)}/{kind}"

    def desired(self, host: str) -> str:
        return self.host(host, "desired")

    def answer(self, host: str) -> str:
        return self.host(host, "answer")

    def events(self, host: str) -> str:
        return self.host(host, "events")

    def prompt(self, host: str) -> str:
        return self.host(host, "prompt")

    def state(self, host: str) -> str:
        return self.host(host, "state")

    def online(self, host: str) -> str:
        return self.host(host, "online")

    def confirm(self, host: str) -> str:
        """Round-trip topic the agent uses to prove it still reaches the broker."""
        return self.host(host, "confirm")

    def all_hosts(self, kind: HostTopicKind) -> str:
        """Wildcard subscription for one kind of topic across the fleet."""
        return f"{self.prefix}/host/+/{kind}"

    def shared(self, group: str, topic: str) -> str:
        """MQTT 5 shared subscription, so controllers can split the load."""
        if not group or any(c in group for c in "/+#.") or any(c.isspace() for c in group):
            raise InputError(f"invalid share group {group!r}: no '/', '+', '#', '.' or "
                             "white space")
        return f"$share/{group}/{topic}"

    def parse(self, topic: str) -> tuple[str, HostTopicKind]:
        """(host, kind) of a host topic; InputError for anything else."""
        head = f"{self.prefix}/host/"
        if not topic.startswith(head):
            raise InputError(f"not a Flotilla host topic: {topic!r}")
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or rest[1] not in HOST_TOPIC_KINDS:
            raise InputError(f"not a Flotilla host topic: {topic!r}")
        kind: HostTopicKind = rest[1]  # type: ignore[assignment]
        return validate_host(rest[0]), kind

    def ha_discovery(self, component: str, host: str, object_id: str) -> str:
        if not re.fullmatch(r"[a-z_]+", component) or not re.fullmatch(r"[a-z0-9_]+", object_id):
            raise InputError(f"invalid discovery component/object {component}/{object_id}")
        return f"{self.ha_prefix}/{component}/flotilla_{validate_host(host)}/{object_id}/config"

    def ha_status(self) -> str:
        return f"{self.ha_prefix}/status"

    def ha_host(self, host: str, leaf: str) -> str:
        """JSON topics for Home Assistant entities (state and commands) under the host."""
        if not re.fullmatch(r"[a-z0-9_/]+", leaf):
            raise InputError(f"invalid Home Assistant leaf {leaf!r}")
        return f"{self.prefix}/host/{validate_host(host)}/ha/{leaf}"
