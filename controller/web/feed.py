"""The dashboard's live picture of the fleet: the broker and the event log, folded.

One MQTT connection subscribes to every host's retained `desired`, `state`, `prompt`
and `online` topics and to the live `events`; each host's current deployment is a
`HostView` folded with `controller.follow.view` exactly as the rollout driver and `fleetctl
watch` fold it. The controller's event log (rollouts, what the driver decided) is
followed incrementally. Every change wakes the listeners (one per open page stream),
which re-render what they show and send what changed.

The connection is kept up: on loss it reconnects (with backoff) and catches up from
the retained messages; the pages show that the broker is unreachable meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from controller.follow.reader import MessageReader
from controller.follow.view import HostView, fold_event, fold_state
from controller.mqtt.connection import close_client, new_marker, open_client, subscribe_and_sync
from controller.rollout.driver import ControllerContext
from controller.state.eventlog import EventLog
from controller.state.inventory import Inventory
from protocol.errors import BrokerRefused, BrokerUnavailable, FlotillaError
from protocol.messages import HostMessage
from protocol.models import Desired, Event, HostState, Prompt
from protocol.mqtt import Backoff, Failover, cancel_and_wait

log = logging.getLogger(__name__)
LOG_POLL_S = 0.25
SYNC_TIMEOUT_S = 30.0


@dataclass
class HostLive:
    """Everything known about one inventory host."""

    host: str
    tags: tuple[str, ...]
    state: HostState | None = None
    online: bool | None = None
    prompt: Prompt | None = None
    view: HostView | None = None        # its current deployment
    rollout_id: str | None = None
    version: int = 0                    # bumped on every change (render caches key on it)


@dataclass(eq=False)
class Listener:
    """One open stream, woken on every change (it re-renders and sends what differs)."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Feed:
    def __init__(self, ctx: ControllerContext, inventory: Inventory) -> None:
        self.ctx = ctx
        self.hosts = {h: HostLive(h, tags) for h, tags in inventory.hosts.items()}
        self.log = EventLog(ctx.state_dir)
        self.doc: dict[str, Any] = {}
        self.connected = False
        self.synced = asyncio.Event()
        self.error: str | None = None       # the broker's, while it is unreachable
        self.log_error: str | None = None   # the event log's, while it cannot be read
        self._listeners: set[Listener] = set()
        self._marker: str | None = None
        self._reader = MessageReader(ctx.topics)

    # -- listeners -------------------------------------------------------------------
    def listen(self) -> Listener:
        lst = Listener()
        self._listeners.add(lst)
        return lst

    def unlisten(self, lst: Listener) -> None:
        self._listeners.discard(lst)

    def _notify(self) -> None:
        for lst in self._listeners:
            lst.wake.set()

    # -- the event log ---------------------------------------------------------------
    def refresh_log(self) -> bool:
        """Catch up with the controller's event log; True if it changed. A log that
        cannot be read (StateError) keeps what was read before and sets `log_error`
        (said once in the server's log, shown on the pages) until it reads again."""
        if not self.log.exists():
            return self._log_readable()
        before = self.log.index
        try:
            self.doc = self.log.refresh()
        except FlotillaError as exc:
            if str(exc) != self.log_error:
                log.warning("cannot read the event log: %s", exc)
                self.log_error = str(exc)
                self._notify()
            raise
        changed = self._log_readable()
        if self.log.index != before:
            self._notify()
            return True
        return changed

    def _log_readable(self) -> bool:
        if self.log_error is None:
            return False
        log.info("the event log %s is readable again", self.log.path)
        self.log_error = None
        self._notify()
        return True

    def rollouts(self) -> dict[str, dict[str, Any]]:
        r: dict[str, dict[str, Any]] = self.doc.get("rollouts", {})
        return r

    # -- MQTT ----------------------------------------------------------------------------
    def on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        if topic == self._marker:
            self.synced.set()
            self._notify()
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        msg = self._reader.read(topic, payload, self.hosts.__contains__)
        if msg is None:
            return
        h = self.hosts[msg.host]
        if self._fold(h, msg):
            h.version += 1
            self._notify()

    def _fold(self, h: HostLive, msg: HostMessage) -> bool:
        body = msg.body
        if msg.online is not None:
            changed = h.online != msg.online
            h.online = msg.online
            if h.view is not None:
                h.view.online = msg.online
            return changed
        if msg.kind == "prompt":
            h.prompt = body if isinstance(body, Prompt) else None
            return True
        if isinstance(body, Desired):
            self._attempt(h, body.deployment_id, body.generation, body.issued_at)
            h.rollout_id = body.rollout_id
            return True
        if isinstance(body, HostState):
            st = body
            h.state = st
            if st.deployment_id is not None and (
                    h.view is None or (h.view.deployment_id != st.deployment_id
                                       and st.desired_generation > h.view.generation)):
                self._attempt(h, st.deployment_id, st.desired_generation or st.generation,
                              None)
                h.rollout_id = st.rollout_id
            if h.view is not None:
                fold_state(h.view, st)
            return True
        if isinstance(body, Event):
            return h.view is not None and fold_event(h.view, body)
        return False

    @staticmethod
    def _attempt(h: HostLive, deployment_id: str, generation: int, started: float | None
                 ) -> None:
        v = h.view
        if v is not None and v.deployment_id == deployment_id:
            return
        if v is not None and generation < v.generation:
            return  # an older deployment's retained message
        h.view = HostView(h.host, deployment_id=deployment_id, generation=generation,
                          started=started, phase="published", online=h.online)

    async def run(self, ready: asyncio.Event) -> None:
        """Follow the broker and the event log until cancelled. The first connection's
        failure raises BrokerUnavailable; later losses reconnect."""
        poller = asyncio.create_task(self._poll_log())
        try:
            await self._follow_broker(ready)
        finally:
            await cancel_and_wait(poller)

    async def _poll_log(self) -> None:
        while True:
            with contextlib.suppress(FlotillaError):  # refresh_log said so, once
                self.refresh_log()
            await asyncio.sleep(LOG_POLL_S)

    async def _follow_broker(self, ready: asyncio.Event) -> None:
        """Connect through `open_client` like every command (any node of a cluster, in
        failover order, within --connect-timeout; a refusal raises BrokerRefused at
        once). Before `ready`, failing to connect ends the dashboard; after, a lost
        connection is retried (the pages say the broker is unreachable), a refusal
        still ends it (retrying cannot fix credentials or the MQTT version)."""
        t = self.ctx.topics
        filters = [t.all_hosts("desired"), t.all_hosts("state"), t.all_hosts("prompt"),
                   t.all_hosts("online"), t.all_hosts("events")]
        failover = Failover(len(self.ctx.broker.addresses), backoff=Backoff(cap=5.0))
        while True:
            try:
                client = await open_client(self.ctx.broker, failover,
                                           client_id=f"fleetctl-serve-{uuid.uuid4().hex[:8]}",
                                           **self.ctx.client_kwargs)
                try:
                    self.synced.clear()
                    self._marker = new_marker(t)
                    await subscribe_and_sync(client, filters, self._marker)
                    reader = asyncio.create_task(self._read(client))
                    try:
                        await asyncio.wait_for(asyncio.shield(self.synced.wait()),
                                               SYNC_TIMEOUT_S)
                        self.connected, self.error = True, None
                        self._notify()
                        ready.set()
                        await reader
                    finally:
                        await cancel_and_wait(reader, aiomqtt.MqttError)
                finally:
                    await close_client(client)
            except BrokerRefused:
                raise
            except (aiomqtt.MqttError, TimeoutError, BrokerUnavailable) as exc:
                if not ready.is_set():
                    if isinstance(exc, BrokerUnavailable):
                        raise
                    raise BrokerUnavailable(
                        f"cannot reach the MQTT broker at {self.ctx.broker}: {exc}") from None
                self.error = f"broker {self.ctx.broker} unreachable: {exc}"
                log.warning("%s; reconnecting", self.error)
            finally:
                if self.connected:
                    self.connected = False
                    self._notify()
            await asyncio.sleep(failover.delay())

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.on_message(message)
