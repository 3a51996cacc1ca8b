"""The controller's side of `protocol.messages.host_message`: skip, warn once, go on.

Every controller reader (deploy driver, watch, status, prompts, the dashboard) reads
host messages through a `MessageReader`: a bad one is skipped with one warning line that
names its topic (once per topic, so 10,000 retained garbage messages do not flood the
terminal), never an exit, and a host whose own payload is unreadable is remembered, so
`status` can say "unreadable" instead of "no data".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from protocol.errors import ProtocolError
from protocol.messages import HostMessage, host_message
from protocol.topics import Topics

log = logging.getLogger(__name__)

MAX_WARNINGS = 20


class MessageReader:
    def __init__(self, topics: Topics, max_warnings: int = MAX_WARNINGS) -> None:
        self.topics = topics
        self.max_warnings = max_warnings
        self.unreadable: dict[tuple[str, str], str] = {}
        """(host, kind) -> why its latest payload could not be read."""
        self._warned: set[str] = set()

    def read(self, topic: str, payload: bytes, wanted: Callable[[str], bool] | None = None
             ) -> HostMessage | None:
        """The message; None when it is unreadable (warned) or its host is not `wanted`."""
        try:
            message = host_message(self.topics, topic, payload, wanted)
        except ProtocolError as exc:
            host = getattr(exc, "host", None)
            if host is not None:
                self.unreadable[(host, topic.rsplit("/", 1)[-1])] = str(exc)
            self._warn(topic, exc)
            return None
        if message is not None:
            self.unreadable.pop((message.host, message.kind), None)
        return message

    def _warn(self, topic: str, exc: ProtocolError) -> None:
        if topic in self._warned or len(self._warned) > self.max_warnings:
            return
        self._warned.add(topic)
        if len(self._warned) > self.max_warnings:
            log.warning("skipping further unreadable messages without a warning")
        else:
            log.warning("skipping an unreadable message on %s", exc)
