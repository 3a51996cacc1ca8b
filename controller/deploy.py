"""The rollout driver: the only place that turns planner actions into MQTT traffic.

It publishes signed retained Desired states, folds agent events and retained host
states into HostViews, asks the pure planner (`controller.planner`) what to do next,
records every change in the event log (group commits), and survives broker restarts
with a persistent session plus a catch-up read of retained host states.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller import store
from controller.connection import make_client, sync_marker
from controller.eventlog import EventLog, Patch
from controller.planner import (
    Abort,
    AwaitContinue,
    Finish,
    Plan,
    RolloutPolicy,
    RolloutProgress,
    Skip,
    Start,
    TimeOut,
    plan,
)
from controller.view import HostView, fold_event, fold_state
from protocol.broker import BrokerAddress
from protocol.codec import decode, encode
from protocol.errors import BrokerUnavailable, ProtocolError
from protocol.models import EVENT_TYPES, DeployPolicy, Desired, Event, HostState
from protocol.signing import sign
from protocol.topics import Topics

log = logging.getLogger(__name__)
PUBLISH_CONCURRENCY = 256
PLAN_INTERVAL = 0.05


@dataclass
class ControllerContext:
    broker: BrokerAddress
    topics: Topics
    state_dir: Path
    key: Ed25519PrivateKey | None = None
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    share_group: str | None = None

    @property
    def eventlog(self) -> EventLog:
        return EventLog(self.state_dir)


@dataclass
class DeployRequest:
    selector: str
    hosts: list[str]
    system: str
    action: str = "switch"
    timeout: float = 600.0
    choices: dict[str, str] = field(default_factory=dict)
    agent_policy: DeployPolicy = field(default_factory=DeployPolicy)
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    check_only: bool = False
    expires_in: float | None = None


@dataclass
class Outcome:
    rollout_id: str
    status: str
    views: dict[str, HostView]
    started: float
    finished: float

    def counts(self) -> dict[str, int]:
        c = {"succeeded": 0, "failed": 0, "timed_out": 0, "not_started": 0}
        for v in self.views.values():
            if v.result == "succeeded":
                c["succeeded"] += 1
            elif v.result == "timed_out":
                c["timed_out"] += 1
            elif (v.result is None and v.deployment_id is None) or v.result == "skipped":
                c["not_started"] += 1
            else:
                c["failed"] += 1
        return c

    def summary(self) -> dict[str, Any]:
        return {"rollout": self.rollout_id, "status": self.status, **self.counts(),
                "hosts": {h: v.result for h, v in self.views.items()}}


class RolloutDriver:
    def __init__(self, ctx: ControllerContext, req: DeployRequest, rollout_id: str | None = None,
                 on_change: Callable[[RolloutDriver], None] | None = None) -> None:
        self.ctx = ctx
        self.req = req
        self.rollout_id = rollout_id or store.new_rollout_id()
        self.log = ctx.eventlog
        self.views: dict[str, HostView] = {h: HostView(h) for h in req.hosts}
        self.on_change = on_change
        self.started = time.time()
        self._dirty: list[tuple[str, Patch]] = []
        self._client: aiomqtt.Client | None = None
        self._publish_sem = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        self._changed = asyncio.Event()
        self.batches: list[list[str]] = []
        self.progress = RolloutProgress()
        self.confirm_batch: Callable[[RolloutDriver, int], Awaitable[bool]] | None = None

    # -- event-log bookkeeping ---------------------------------------------------------
    def create(self) -> None:
        if self.ctx.key is None:
            raise BrokerUnavailable("no signing key")  # guarded by the CLI
        self.batches = self.req.rollout.batches(self.req.hosts)
        with self.log.transaction() as doc:
            patch = store.create_rollout(doc, self.rollout_id, self.req.selector,
                                         self.req.system, self.req.action,
                                         {"rollout": self.req.rollout.as_dict(),
                                          "agent": self.req.agent_policy.model_dump(),
                                          "check_only": self.req.check_only,
                                          "timeout": self.req.timeout},
                                         self.batches)
        self.log.append("rollout-created", patch)

    def _record(self, event: str, patch: Patch) -> None:
        if patch:
            self._dirty.append((event, patch))

    def flush(self) -> None:
        if self._dirty:
            entries, self._dirty = self._dirty, []
            self.log.append_many(entries)

    def _host_status(self, host: str, status: str, message: str = "",
                     system: str | None = None) -> None:
        doc = self.log.doc
        patch = store.host_update(doc, self.rollout_id, host, status, message, system)
        # apply immediately to our in-memory copy via a write (group-committed below)
        self._record(f"host-{status}", patch)

    # -- MQTT ----------------------------------------------------------------------------
    async def _publish_desired(self, host: str, attempt: int) -> None:
        assert self.ctx.key is not None
        deployment_id = self.rollout_id if attempt == 1 else f"{self.rollout_id}.{attempt}"
        with self.log.transaction() as doc:
            generation, patch = store.start_host(doc, self.rollout_id, host, deployment_id)
        self.log.append("host-started", patch)
        now = time.time()
        desired = Desired(
            host=host, deployment_id=deployment_id, rollout_id=self.rollout_id,
            generation=generation, system=self.req.system, action=self.req.action,  # type: ignore[arg-type]
            issued_at=now, expires_at=now + self.req.expires_in if self.req.expires_in else None,
            check_only=self.req.check_only, choices=self.req.choices,
            policy=self.req.agent_policy,
        )
        payload = encode(sign(desired, self.ctx.key))
        v = self.views[host]
        v.deployment_id, v.generation, v.started = deployment_id, generation, now
        v.phase, v.result, v.finished, v.last_seq = "published", None, None, -1
        await self._publish(self.ctx.topics.desired(host), payload, retain=True)

    async def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        async with self._publish_sem:
            while True:
                client = self._client
                if client is None:
                    await asyncio.sleep(0.1)
                    continue
                try:
                    await client.publish(topic, payload, qos=1, retain=retain, timeout=30)
                    return
                except aiomqtt.MqttError:
                    await asyncio.sleep(0.2)

    async def clear_desired(self, host: str) -> None:
        await self._publish(self.ctx.topics.desired(host), b"", retain=True)

    def _subscriptions(self) -> list[str]:
        t = self.ctx.topics
        events = t.all_hosts("events")
        if self.ctx.share_group:
            events = t.shared(self.ctx.share_group, events)
        return [events, t.all_hosts("state"), t.all_hosts("online")]

    def _on_message(self, message: aiomqtt.Message) -> None:
        try:
            host, kind = self.ctx.topics.parse(str(message.topic))
        except ProtocolError:
            return
        except Exception:
            return
        view = self.views.get(host)
        if view is None:
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if kind == "online":
            view.online = payload == b"online"
            return
        if not payload:
            return
        try:
            if kind == "events":
                ev: Event = decode(payload, expect=EVENT_TYPES)
                was_done = view.done
                if not fold_event(view, ev) or was_done:
                    return
            elif kind == "state":
                st: HostState = decode(payload, expect=(HostState,))
                was_done = view.done
                if not fold_state(view, st) or was_done:
                    return
            else:
                return
        except ProtocolError as exc:
            log.warning("ignoring malformed %s message from %s: %s", kind, host, exc)
            return
        if view.done:
            self._host_status(host, view.result or "failed", view.message, view.system)
        self._changed.set()
        if self.on_change is not None:
            self.on_change(self)

    async def _session(self, ready: asyncio.Event) -> None:
        """Keep one persistent session up; on every (re)connect resubscribe and catch up."""
        delay = 0.2
        while True:
            try:
                client = make_client(self.ctx.broker, client_id=f"fleetctl-{self.rollout_id}",
                                     persistent=True, **self.ctx.client_kwargs)
                async with client:
                    for topic in self._subscriptions():
                        await client.subscribe(topic, qos=1)
                    await sync_marker(client, self.ctx.topics)
                    self._client = client
                    ready.set()
                    delay = 0.2
                    async for message in client.messages:
                        self._on_message(message)
            except aiomqtt.MqttError as exc:
                self._client = None
                if not ready.is_set():
                    raise BrokerUnavailable(
                        f"cannot reach the MQTT broker at {self.ctx.broker}: {exc}") from None
                log.warning("broker connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._client = None

    # -- the loop ------------------------------------------------------------------------
    async def run(self, wait: bool = True) -> Outcome:
        ready = asyncio.Event()
        session = asyncio.create_task(self._session(ready), name="controller-session")
        try:
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait([session, waiter], return_when=asyncio.FIRST_COMPLETED)
            if session.done():
                session.result()  # raises BrokerUnavailable
            waiter.cancel()
            if not self.batches:
                self.create()
            deadline = self.started + self.req.timeout
            status = await self._drive(deadline, wait)
        finally:
            self.flush()
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerUnavailable):
                await session
        return Outcome(self.rollout_id, status, self.views, self.started, time.time())

    async def _drive(self, deadline: float, wait: bool) -> str:
        pr = self.progress
        while True:
            now = time.time()
            self._note_batches(now)
            actions = plan(self.req.rollout, list(self.views.values()), self.batches, now,
                           deadline, pr)
            starts: list[Start] = []
            for a in actions:
                if isinstance(a, Start):
                    pr.attempts[a.host] = a.attempt
                    starts.append(a)
                elif isinstance(a, TimeOut):
                    v = self.views[a.host]
                    v.result, v.phase, v.finished = "timed_out", "timed_out", now
                    self._host_status(a.host, "timed_out", "no result before the timeout")
                elif isinstance(a, Skip):
                    v = self.views[a.host]
                    v.result, v.phase, v.message = "skipped", "skipped", a.reason
                    self._host_status(a.host, "skipped", a.reason)
                elif isinstance(a, Abort):
                    pr.aborted = a.reason
                    self._record("rollout-aborting", store.set_rollout_field(
                        self.rollout_id, "abort_reason", a.reason))
                    await self._cancel_unacked()
                elif isinstance(a, AwaitContinue):
                    await self._await_continue(a.batch)
            if starts:
                await asyncio.gather(*(self._publish_desired(a.host, a.attempt) for a in starts))
            self.flush()
            if self.on_change is not None:
                self.on_change(self)
            finish = next((a for a in actions if isinstance(a, Finish)), None)
            if finish is not None:
                self._record("rollout-finished",
                             store.finish_rollout(self.rollout_id, finish.status))
                return finish.status
            if not wait:
                return "published"
            if any(isinstance(a, AwaitContinue) for a in actions):
                continue
            wake = next((a.at for a in actions if isinstance(a, Plan)), now + 1.0)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.01, min(wake, deadline) - now))
            await asyncio.sleep(PLAN_INTERVAL)  # let a burst of events fold before re-planning

    def _note_batches(self, now: float) -> None:
        for index, batch in enumerate(self.batches):
            if index in self.progress.batch_done_at:
                continue
            if all(self.views[h].result is not None for h in batch):
                self.progress.batch_done_at[index] = now

    async def _cancel_unacked(self) -> None:
        """On abort: hosts that were sent a desired state but have not acked lose it."""
        for v in self.views.values():
            if v.deployment_id is not None and v.result is None and v.phase == "published":
                await self.clear_desired(v.host)
                v.result, v.phase, v.message = "cancelled", "cancelled", "rollout aborted"
                self._host_status(v.host, "cancelled", "rollout aborted before the host acked")

    async def _await_continue(self, batch: int) -> None:
        """Wait for `fleetctl rollout continue ID` (or an interactive yes)."""
        if self.confirm_batch is not None and await self.confirm_batch(self, batch):
            self.progress.continued.add(batch)
            return
        while True:
            doc = self.log.load()
            continued = doc["rollouts"][self.rollout_id].get("continued", [])
            if batch in continued:
                self.progress.continued.add(batch)
                return
            if doc["rollouts"][self.rollout_id].get("abort_requested"):
                self.progress.aborted = "aborted by the operator"
                return
            await asyncio.sleep(0.5)
