"""One parse for every message a controller reads from a host's topics.

Pure. `host_message(topics, topic, payload)` turns a delivered (topic, payload) into a
typed `HostMessage` or raises `BadHostMessage` (a ProtocolError), one line that names
the topic: a topic that is no Flotilla host topic (`fleet/v1/host/Web1/state`: not a
valid host name), a payload that is not the model the topic carries, a payload for
another host, an `online` flag that is neither `online` nor `offline`. Every reader
(deploy driver, watch, status, prompts, the dashboard) uses it, so one stray retained
message is skipped the same way everywhere instead of ending a command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol.codec import decode
from protocol.errors import InputError, ProtocolError
from protocol.models import (
    EVENT_TYPES,
    Answer,
    Confirm,
    Desired,
    HostState,
    Model,
    Prompt,
)
from protocol.topics import HostTopicKind, Topics

TOPIC_SHOWN = 120  # characters of a sender-chosen topic quoted in an error

BODY_TYPES: dict[str, tuple[type[Model], ...]] = {
    "events": EVENT_TYPES,
    "state": (HostState,),
    "prompt": (Prompt,),
    "desired": (Desired,),
    "answer": (Answer,),
    "confirm": (Confirm,),
}


class BadHostMessage(ProtocolError):
    """A message on a host topic that is refused; `host` is set when the topic named one."""

    reason = "bad_message"

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


@dataclass(frozen=True)
class HostMessage:
    host: str
    kind: HostTopicKind
    body: Model | None = None
    """The decoded payload; None for an empty (cleared retained) payload or `online`."""
    online: bool | None = None
    """For `online` topics: the agent's flag."""


def shown(topic: str) -> str:
    """A topic quoted in an error: printable and bounded (the sender chose it)."""
    text = topic if topic.isprintable() else repr(topic)[1:-1]
    return text if len(text) <= TOPIC_SHOWN else text[:TOPIC_SHOWN] + "..."


def host_message(topics: Topics, topic: str, payload: bytes,
                 wanted: Callable[[str], bool] | None = None) -> HostMessage | None:
    """The message, or None for a valid topic of a host `wanted` says no to (its payload
    is then not even decoded: a driver of 10 hosts does not parse 10,000 hosts' events)."""
    try:
        host, kind = topics.parse(topic)
    except InputError as exc:
        reason = "not a Flotilla host topic" if "host topic" in str(exc) else str(exc)
        raise BadHostMessage(f"{shown(topic)}: {shown(reason)}") from None
    if wanted is not None and not wanted(host):
        return None
    if kind == "online":
        if payload not in (b"online", b"offline"):
            raise BadHostMessage(f"{shown(topic)}: expected online or offline", host)
        return HostMessage(host, kind, online=payload == b"online")
    if not payload:
        return HostMessage(host, kind)
    try:
        body = decode(payload, expect=BODY_TYPES[kind])
    except ProtocolError as exc:
        raise BadHostMessage(f"{shown(topic)}: {exc}", host) from None
    body_host = getattr(body, "host", host)
    if body_host != host:
        raise BadHostMessage(f"{shown(topic)}: the payload is for host {body_host}", host)
    return HostMessage(host, kind, body)
