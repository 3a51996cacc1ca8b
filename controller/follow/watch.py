"""`fleetctl watch [ID]`: follow a rollout from any terminal.

The watcher never publishes anything. It learns which hosts belong to the rollout from
the event log when this machine has it (hosts, batches, generations, and what the
driver decided: timeouts, skips, cancels, the rollout's status), and in any case from
the retained `desired` messages (each names its rollout, deployment and generation),
so a terminal without the controller's state directory can watch too. Progress comes
from the retained host states and the live events.

It ends when the rollout finishes: the event log records a final status, or (without
a log, or for a `--no-wait` rollout nobody drives) every host has a result.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from controller.follow.monitor import ChangeTracker
from controller.follow.reader import MessageReader
from controller.follow.view import HostView, fold_event, fold_state, fold_superseded
from controller.mqtt.connection import new_marker, subscribe_and_sync, while_connected
from controller.rollout.driver import ControllerContext, Outcome
from controller.state import store
from protocol.errors import InputError, UsageError
from protocol.models import Desired, Event, HostState
from protocol.mqtt import cancel_and_wait, random_client_id
from protocol.outcomes import ROLLOUT_FINAL, rollout_result

REFRESH_INTERVAL = 0.5


@dataclass
class WatchResult:
    rollout_id: str
    status: str
    finished: bool
    summary: dict[str, Any]


class Watcher:
    def __init__(self, ctx: ControllerContext, rollout_id: str | None) -> None:
        self.ctx = ctx
        self.log = ctx.eventlog
        self.rollout_id = rollout_id or ""
        self.from_log = False
        self.status = "running"
        self.system = ""
        self.views: dict[str, HostView] = {}
        self.batches: list[list[str]] = []
        self.started = time.time()
        self.created: float | None = None  # the rollout's own times, from the event log
        self.closed: float | None = None
        self._tracker = ChangeTracker()
        self._changed: set[str] = set()
        self._marker: str | None = None
        self._synced = asyncio.Event()
        self.on_host_change: Callable[[HostView], None] | None = None
        self.on_change: Callable[[Watcher], None] | None = None
        self._unknown = ""
        self._log_index = -1
        self._resolve()

    # -- which rollout ---------------------------------------------------------------
    def _resolve(self) -> None:
        doc: dict[str, Any] = self.log.load() if self.log.exists() else {}
        r: dict[str, Any] | None
        if self.rollout_id:
            try:
                r = store.find_rollout(doc, self.rollout_id)
            except InputError as exc:
                # Maybe another controller's rollout: learn its hosts from the broker.
                self._unknown = str(exc)
                r = None
        else:
            r = store.latest_rollout(doc, running_only=True) or store.latest_rollout(doc)
            if r is None:
                raise UsageError(f"no rollout recorded in {self.log.path}; "
                                 "give the rollout id: fleetctl watch ID")
        if r is not None:
            self.rollout_id, self.from_log = r["id"], True
            self.batches = store.host_batches(r)
            self.views = {h: HostView(h) for h in r["hosts"]}
            self._apply_log(r)

    def _apply_log(self, r: dict[str, Any]) -> None:
        self.status, self.system = r.get("status", "running"), r.get("system", "")
        self.created, self.closed = r.get("created"), r.get("finished")
        for h, hr in r.get("hosts", {}).items():
            v = self.views.get(h)
            if v is None:
                continue
            dep = hr.get("deployment_id")
            if dep is not None and dep != v.deployment_id:
                self._new_attempt(v, dep, int(hr.get("generation") or 0), hr.get("started"))
                v = self.views[h]
            if hr.get("result") is not None and v.result is None and dep == v.deployment_id:
                v.result = v.phase = hr["result"]
                v.message, v.finished = hr.get("message", ""), hr.get("finished")
                self._changed.add(h)

    def _new_attempt(self, v: HostView, dep: str, generation: int, started: float | None
                     ) -> None:
        fresh = HostView(v.host, deployment_id=dep, generation=generation, started=started,
                         phase="published", online=v.online)
        self.views[v.host] = fresh
        self._changed.add(v.host)

    def refresh_log(self) -> None:
        if not self.from_log:
            return
        doc = self.log.refresh()
        if self.log.index == self._log_index:
            return
        self._log_index = self.log.index
        r = doc.get("rollouts", {}).get(self.rollout_id)
        if r is not None:
            self._apply_log(r)

    # -- messages ------------------------------------------------------------------------
    @functools.cached_property
    def _reader(self) -> MessageReader:
        return MessageReader(self.ctx.topics)

    def on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        if topic == self._marker:
            self._synced.set()
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        desired = topic.endswith("/desired")  # any host's: another controller's rollout
        msg = self._reader.read(topic, payload, lambda h: desired or h in self.views)
        if msg is None:
            return
        host, body = msg.host, msg.body
        if msg.kind == "desired":
            if isinstance(body, Desired):
                self._on_desired(host, body)
            return
        view = self.views.get(host)
        if view is None:
            return
        if msg.online is not None:
            if view.online != msg.online:
                view.online = msg.online
                self._changed.add(host)
        elif isinstance(body, Event):
            if fold_event(view, body):
                self._changed.add(host)
        elif isinstance(body, HostState) and fold_state(view, body):
            self._changed.add(host)

    def _on_desired(self, host: str, d: Desired) -> None:
        if d.rollout_id != self.rollout_id:
            v = self.views.get(host)
            if v is not None and fold_superseded(v, d.deployment_id, d.generation):
                self._changed.add(host)
            return
        if self.from_log and host not in self.views:
            return
        v = self.views.get(host) or HostView(host)
        self.views.setdefault(host, v)
        if v.deployment_id != d.deployment_id and (
                v.deployment_id is None or d.generation > v.generation):
            self.system = self.system or d.system
            self._new_attempt(v, d.deployment_id, d.generation, d.issued_at)

    def changes(self) -> list[HostView]:
        """Hosts whose deployment, phase or result changed since the last call."""
        out = self._tracker.changes(self.views[h] for h in sorted(self._changed))
        self._changed.clear()
        return out

    def finished(self) -> bool:
        if self.status in ROLLOUT_FINAL:
            return True
        return bool(self.views) and all(v.result is not None for v in self.views.values())

    def final_status(self) -> str:
        if self.status in ROLLOUT_FINAL:
            return self.status
        if self.finished():
            return rollout_result(v.result or "" for v in self.views.values())
        return self.status

    def duration(self) -> float:
        """The rollout's run time (not this watch's): from its creation to its end."""
        begin = self.created or self.started
        return (self.closed or time.time()) - begin

    def summary(self) -> dict[str, Any]:
        return Outcome(self.rollout_id, self.final_status(), self.views, self.started,
                       time.time()).summary()

    # -- the loop ------------------------------------------------------------------------
    async def run(self, timeout: float | None) -> WatchResult:
        """Follow until the rollout finishes (or `timeout`). A connection lost meanwhile
        (a cluster node restarting, Mosquitto restarted) is taken up again on any node,
        in failover order, within --connect-timeout: retained states and the event log
        catch the watch up, and a host is printed again only if it changed."""
        t = self.ctx.topics
        filters = [t.all_hosts("desired"), t.all_hosts("state"), t.all_hosts("online"),
                   self.ctx.events_filter()]
        deadline = time.monotonic() + timeout if timeout is not None else None
        await while_connected(self.ctx.broker,
                              lambda client: self._watch(client, filters, deadline),
                              client_id=random_client_id("fleetctl-watch"),
                              **self.ctx.client_kwargs)
        return WatchResult(self.rollout_id, self.final_status(), self.finished(),
                           self.summary())

    async def _watch(self, client: aiomqtt.Client, filters: list[str],
                     deadline: float | None) -> bool:
        """Follow on one connection until done (True); MqttError when it is lost."""
        self._synced.clear()
        self._marker = new_marker(self.ctx.topics)
        await subscribe_and_sync(client, filters, self._marker)
        reader = asyncio.create_task(self._read(client))
        try:
            await self._follow(reader, deadline)
            return True
        finally:
            await cancel_and_wait(reader, aiomqtt.MqttError)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.on_message(message)

    async def _follow(self, reader: asyncio.Task[None], deadline: float | None) -> None:
        # Catch up on everything retained before saying anything.
        await self._wait(self._synced.wait(), reader, deadline)
        if not self._synced.is_set():
            return
        if not self.views:
            raise InputError(f"{self._unknown or 'unknown rollout ' + repr(self.rollout_id)}"
                             "; no host holds a desired state from it either")
        self._changed |= set(self.views)
        while True:
            self.refresh_log()
            self._publish_changes()
            if self.finished():
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            await self._wait(asyncio.sleep(REFRESH_INTERVAL / 5), reader, deadline)

    def _publish_changes(self) -> None:
        changed = self.changes()
        if self.on_host_change is not None:
            for v in changed:
                self.on_host_change(v)
        if self.on_change is not None:
            self.on_change(self)

    @staticmethod
    async def _wait(aw: Any, reader: asyncio.Task[None], deadline: float | None) -> None:
        task = asyncio.ensure_future(aw)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait([task, reader], timeout=left,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
        if reader in done:
            reader.result()  # the connection broke: raise MqttError
            raise aiomqtt.MqttError("the broker closed the connection")

