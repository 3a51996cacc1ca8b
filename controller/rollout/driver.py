"""The rollout driver: the only place that turns planner actions into MQTT traffic.

It publishes signed retained Desired states, folds agent events and retained host
states into HostViews, asks the pure planner (`controller.rollout.planner`) what to do next,
records every change in the event log (group commits: one fsync per planning round,
plus one write-ahead fsync per group of hosts it starts), and survives broker restarts
with a persistent session plus a catch-up read of retained host states.

A host's generation is the next one after both what the event log gave it and what its
retained state and desired state (read when the session connects) say it has seen: a
log restored from an older backup must not hand out generations the agent refuses.

A driver also resumes a rollout whose controller died (`RolloutDriver.from_log`): the
event log says which hosts were given which generation; retained host states and the
persistent session's queued events say what happened meanwhile. Hosts that were given
a generation keep it: their desired state is re-published (same deployment id, same
generation, which an agent treats as the same deployment) only if the broker lost it.

While it runs, the driver holds `STATE_DIR/locks/ROLLOUT.lock`, so two processes never
drive one rollout, and polls the event log for `fleetctl rollout abort|continue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.follow.reader import MessageReader
from controller.follow.view import HostView, fold_event, fold_state, seen_generation
from controller.mqtt.connection import (
    SYNC_TIMEOUT,
    close_client,
    connect,
    new_marker,
    open_client,
    shared_subscription_works,
    subscribe_and_sync,
)
from controller.rollout.planner import (
    Abort,
    AwaitContinue,
    BatchDone,
    Cancel,
    Finish,
    Plan,
    Planner,
    RolloutPolicy,
    RolloutProgress,
    Skip,
    Start,
    TimeOut,
)
from controller.rollout.reconcile import reconcile
from controller.state import store
from controller.state.eventlog import EventLog, Patch
from controller.state.logs import LATE_LINES_S, LogStore, rollout_of
from protocol import outcomes
from protocol.broker import BrokerCluster
from protocol.codec import encode
from protocol.errors import BrokerUnavailable, InputError, StateError, UsageError
from protocol.models import (
    BinaryCache,
    Confirm,
    DeployPolicy,
    Desired,
    Event,
    HostState,
    Result,
    carried_lines,
)
from protocol.mqtt import Backoff, Failover, cancel_and_wait, client_id, publish_until_lost
from protocol.signing import sign
from protocol.topics import Topics

log = logging.getLogger(__name__)
PUBLISH_CONCURRENCY = 256
PLAN_INTERVAL = 0.05
LOG_POLL_INTERVAL = 0.5


Handler = Callable[[aiomqtt.Message], None]


class DispatchQueue(asyncio.Queue):  # type: ignore[type-arg]
    """aiomqtt's incoming-message queue, short-circuited: once its owner's handler is
    set, each message is handled right in the socket read callback. aiomqtt's iterator
    spends a task and several loop turns per message while its reader enqueues hundreds
    per turn, so under a flood of events the queue (and the RSS) grew without bound.
    aiomqtt takes the queue's class (`queue_type`), not an instance: `to(get)` makes the
    class for one owner, whose `get()` returns the handler (None: queue as usual)."""

    @staticmethod
    def handler() -> Handler | None:
        return None

    @classmethod
    def to(cls, get: Callable[[], Handler | None]) -> type[DispatchQueue]:
        return type("DispatchQueue", (cls,), {"handler": staticmethod(get)})

    def put_nowait(self, item: aiomqtt.Message) -> None:
        handler = self.handler()
        if handler is None:
            super().put_nowait(item)
            return
        try:
            handler(item)
        except Exception:  # a handler bug must not tear down the MQTT connection
            log.exception("failed to handle a message on %s", item.topic)


@dataclass
class ControllerContext:
    broker: BrokerCluster
    topics: Topics
    state_dir: Path
    key: Ed25519PrivateKey | None = None
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    share_group: str | None = None

    def __post_init__(self) -> None:
        self.broker = BrokerCluster.of(self.broker)  # a BrokerAddress is a one-node cluster

    @functools.cached_property
    def eventlog(self) -> EventLog:
        """One reader of the state dir's log per command: whoever reads it first (deploy's
        supersede note, resume's lookup) leaves the driver only what was appended since."""
        return EventLog(self.state_dir)

    def events_filter(self) -> str:
        events = self.topics.all_hosts("events")
        return self.topics.shared(self.share_group, events) if self.share_group else events


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
    rollback: bool = False
    expires_in: float | None = None
    # Per-host store paths (deploy.json, or built from the flake), the cache they are
    # fetched from, and whether a boot deploy installs the boot loader.
    systems: dict[str, str] = field(default_factory=dict)
    cache: BinaryCache | None = None
    install_bootloader: bool = False

    def system_for(self, host: str) -> str:
        return self.systems.get(host, self.system)

    def policy_record(self) -> dict[str, Any]:
        return {"rollout": self.rollout.as_dict(), "agent": self.agent_policy.model_dump(),
                "check_only": self.check_only, "rollback": self.rollback,
                "timeout": self.timeout,
                "choices": dict(self.choices), "expires_in": self.expires_in,
                "systems": dict(self.systems),
                "cache": self.cache.model_dump() if self.cache else None,
                "install_bootloader": self.install_bootloader}


@dataclass
class Outcome:
    rollout_id: str
    status: str
    views: dict[str, HostView]
    started: float
    finished: float

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = dict.fromkeys(outcomes.COUNT_KEYS, 0)
        for v in self.views.values():
            cat = outcomes.count_key(v.result, v.deployment_id is not None)
            # A host still running when the controller stopped waiting did not finish in time.
            c["timed_out" if cat == "running" else cat] += 1
        return c

    def summary(self) -> dict[str, Any]:
        return {"rollout": self.rollout_id, "status": self.status, **self.counts(),
                "hosts": {h: v.result for h, v in self.views.items()},
                "logs": {h: v.log_tail for h, v in self.views.items()
                         if outcomes.counts_as_failure(v.result)}}


class DriverLock:
    """flock on STATE_DIR/locks/ROLLOUT.lock while a process drives that rollout."""

    def __init__(self, state_dir: Path, rollout_id: str) -> None:
        self.path = state_dir / "locks" / f"{rollout_id}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise InputError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"rollout {self.path.stem} is being driven by another fleetctl "
                             f"process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def held_elsewhere(self) -> bool:
        """True if some process holds the lock now (used by abort/watch)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


AskContinue = Callable[["RolloutDriver", int], Awaitable[bool | None]]


class RolloutDriver:
    def __init__(self, ctx: ControllerContext, req: DeployRequest, rollout_id: str | None = None,
                 on_change: Callable[[RolloutDriver], None] | None = None) -> None:
        self._lost: asyncio.Future[None] | None = None  # resolves when a connection ends
        self._background: set[asyncio.Task[None]] = set()
        self.ctx = ctx
        self.req = req
        self.rollout_id = rollout_id or store.new_rollout_id()
        self.log = ctx.eventlog
        self.logs = LogStore(ctx.state_dir)
        self.views: dict[str, HostView] = {h: HostView(h) for h in req.hosts}
        self.seen: dict[str, int] = {}
        """The highest generation each host's retained state or desired state named."""
        self.retained_desired: dict[str, Desired] = {}
        """Each host's retained desired state, as the session's last sync read it."""
        self.on_change = on_change
        self.on_host: Callable[[HostView], None] | None = None  # each host's view changed
        self.started = time.time()
        self.status = "running"
        self._dirty: list[tuple[str, Patch]] = []
        self._client: aiomqtt.Client | None = None
        self._publish_sem = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        self._changed = asyncio.Event()
        self._marker: str | None = None
        self._dispatch: Handler | None = None  # handles messages inline once set
        self._reader = MessageReader(ctx.topics)
        self._synced = asyncio.Event()
        self.batches: list[list[str]] = []
        self.progress = RolloutProgress()
        self.planner: Planner | None = None  # built when driving starts
        self.resumed = False
        self.created = False
        self.waiting_for: int | None = None
        self.pause_until: float | None = None
        self.ask_continue: AskContinue | None = None
        self._ask_task: asyncio.Task[None] | None = None
        self._to_clear: list[str] = []
        self._cleared: set[str] = set()
        self._unheard: set[str] = set()  # outcome from a retained state, Result not yet in
        self._heard = asyncio.Event()
        self.lock = DriverLock(ctx.state_dir, self.rollout_id)

    # -- construction from the event log (resume) ------------------------------------
    @classmethod
    def from_log(cls, ctx: ControllerContext, ident: str, timeout: float | None = None
                 ) -> RolloutDriver:
        doc = ctx.eventlog.load()
        r = store.find_rollout(doc, ident)
        if r.get("status") != "running":
            raise UsageError(f"rollout {r['id']} already finished ({r.get('status')}); "
                             "nothing to resume")
        pol = r.get("policy", {})
        try:
            req = DeployRequest(
                selector=r["selector"], hosts=list(r["hosts"]), system=r["system"],
                action=r["action"], timeout=timeout or float(pol.get("timeout", 600.0)),
                choices=dict(pol.get("choices", {})),
                agent_policy=DeployPolicy(**pol.get("agent", {})),
                rollout=RolloutPolicy.from_dict(pol.get("rollout", {})),
                check_only=bool(pol.get("check_only", False)),
                rollback=bool(pol.get("rollback", False)), expires_in=pol.get("expires_in"),
                systems=dict(pol.get("systems") or {}),
                cache=BinaryCache(**pol["cache"]) if pol.get("cache") else None,
                install_bootloader=bool(pol.get("install_bootloader", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"rollout {r['id']} in {ctx.eventlog.path} cannot be resumed: "
                             f"{exc}") from None
        d = cls(ctx, req, r["id"])
        d.batches = store.host_batches(r)
        for h, hr in r["hosts"].items():
            v = d.views[h]
            v.deployment_id, v.generation = hr.get("deployment_id"), int(hr.get("generation") or 0)
            v.started = hr.get("started")
            if hr.get("result") is not None:
                v.result = v.phase = hr["result"]
                v.message, v.finished = hr.get("message", ""), hr.get("finished")
            elif v.deployment_id is not None:
                v.phase = "published"
            if hr.get("attempts"):
                d.progress.attempts[h] = int(hr["attempts"])
        d.progress.continued = {int(i) for i in r.get("continued", [])}
        d.progress.batch_done_at = {int(k): float(t) for k, t in r.get("batch_done", {}).items()}
        if r.get("abort_reason"):
            d.progress.aborted = r["abort_reason"]
        elif r.get("abort_requested"):
            d.progress.aborted = "aborted by the operator"
        d.resumed = d.created = True
        d.log.load()
        return d

    # -- event-log bookkeeping ---------------------------------------------------------
    def create(self) -> None:
        self.batches = self.req.rollout.batches(self.req.hosts)
        with self.log.transaction() as txn:
            txn.add("rollout-created", store.create_rollout(
                txn.doc, self.rollout_id, self.req.selector, self.req.system, self.req.action,
                self.req.policy_record(), self.batches))
        self.created = True

    def _record(self, event: str, patch: Patch) -> None:
        if patch:
            self._dirty.append((event, patch))

    def flush(self) -> None:
        if self._dirty:
            entries, self._dirty = self._dirty, []
            self.log.append_many(entries)

    def _host_status(self, host: str, status: str, message: str = "",
                     system: str | None = None) -> None:
        patch = store.host_update(self.log.doc, self.rollout_id, host, status, message, system)
        self._record(f"host-{status}", patch)

    def _poll_log(self) -> None:
        """Notice `fleetctl rollout abort|continue` (other processes append to the log)."""
        r = self.log.refresh().get("rollouts", {}).get(self.rollout_id)
        if r is None:
            return
        self.progress.continued |= {int(i) for i in r.get("continued", [])}
        if r.get("abort_requested") and self.progress.aborted is None:
            by = r["abort_requested"].get("by", "an operator") \
                if isinstance(r["abort_requested"], dict) else "an operator"
            self._begin_abort(f"aborted by {by}")

    # -- MQTT ----------------------------------------------------------------------------
    def _desired(self, host: str, deployment_id: str, generation: int) -> bytes:
        assert self.ctx.key is not None
        now = time.time()
        desired = Desired(
            host=host, deployment_id=deployment_id, rollout_id=self.rollout_id,
            generation=generation, system=self.req.system_for(host),
            action=self.req.action,  # type: ignore[arg-type]
            issued_at=now, expires_at=now + self.req.expires_in if self.req.expires_in else None,
            check_only=self.req.check_only, rollback=self.req.rollback,
            choices=self.req.choices, policy=self.req.agent_policy, cache=self.req.cache,
            install_bootloader=self.req.install_bootloader,
        )
        return encode(sign(desired, self.ctx.key))

    async def _start_hosts(self, starts: list[Start]) -> None:
        """Write-ahead: give every host its generation in one fsynced append, then publish."""
        now = time.time()
        assigned: list[tuple[str, str, int]] = []
        with self.log.transaction() as txn:
            for a in starts:
                dep, generation, patch = store.start_host(
                    txn.doc, self.rollout_id, a.host, a.attempt, now,
                    seen=self.seen.get(a.host, 0))
                txn.add("host-started", patch)
                assigned.append((a.host, dep, generation))
        for host, dep, generation in assigned:
            v = self.views[host]
            v.deployment_id, v.generation, v.started, v.acked = dep, generation, now, None
            v.phase, v.result, v.finished, v.last_seq = "published", None, None, -1
            v.message, v.percent, v.step, v.log_tail = "", None, None, []
            self._note(v)
        # A fixed pool of publishers, not one task per host: at 10,000 hosts the tasks and
        # their payloads dominated the controller's peak memory. Payloads are signed as
        # they are published.
        todo = iter(assigned)

        async def publisher() -> None:
            for host, dep, generation in todo:
                await self._publish(self.ctx.topics.desired(host),
                                    self._desired(host, dep, generation), retain=True)

        await asyncio.gather(*(publisher() for _ in range(min(PUBLISH_CONCURRENCY,
                                                             len(assigned)))))

    async def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        async with self._publish_sem:
            while True:
                client, lost = self._client, self._lost
                if client is None or lost is None:
                    await asyncio.sleep(0.1)
                    continue
                try:
                    if await publish_until_lost(client, lost, topic, payload, qos=1,
                                                retain=retain):
                        return
                except aiomqtt.MqttError as exc:
                    log.debug("publish to %s failed (%s); retrying", topic, exc)
                await asyncio.sleep(0.2)

    async def clear_desired(self, host: str) -> None:
        await self._publish(self.ctx.topics.desired(host), b"", retain=True)

    def _subscriptions(self) -> list[str]:
        t = self.ctx.topics
        # Results also arrive through the (unshared) retained states, so a driver whose
        # share group routes an event to another member still learns every outcome.
        subs = [self.ctx.events_filter(), t.all_hosts("state"), t.all_hosts("online")]
        if self.req.agent_policy.confirm == "controller":
            subs.append(t.all_hosts("confirm"))
        return subs

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        if topic == self._marker:
            self._synced.set()
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        msg = self._reader.read(topic, payload, self.views.__contains__)
        if msg is None:
            return
        view = self.views[msg.host]
        if msg.online is not None:
            view.online = msg.online
            self._note(view)
            self._changed.set()
            return
        body = msg.body
        if isinstance(body, Confirm):
            self._confirm(msg.host, view, body)
            return
        was_done = view.done
        if isinstance(body, Event):
            self._store_log(body)
            if isinstance(body, Result) and body.deployment_id == view.deployment_id \
                    and msg.host in self._unheard:
                self._unheard.discard(msg.host)
                self._heard.set()
            if not fold_event(view, body):
                return
        elif isinstance(body, Desired):
            self._saw(msg.host, body)
            self.retained_desired[msg.host] = body
            return
        elif isinstance(body, HostState):
            self._saw(msg.host, body)
            if not fold_state(view, body):
                return
            if not was_done and view.done and view.result != "rejected" \
                    and body.deployment_id == view.deployment_id:
                self._unheard.add(msg.host)  # its Result (and last lines) may follow
        else:
            return
        self._note(view)
        if was_done:
            return
        if view.done:
            self._host_status(msg.host, view.result or "failed", view.message, view.system)
        self._changed.set()
        if self.on_change is not None:
            self.on_change(self)

    def _saw(self, host: str, body: HostState | Desired) -> None:
        self.seen[host] = max(self.seen.get(host, 0), seen_generation(body))

    def _store_log(self, ev: Event) -> None:
        """Output lines of our hosts (in Log, Progress and Result events) go to
        STATE_DIR/logs/ROLLOUT/HOST.jsonl."""
        lines, dropped = carried_lines(ev)
        if not (lines or dropped) or ev.deployment_id is None or \
                rollout_of(ev.deployment_id) != self.rollout_id:
            return
        try:
            self.logs.append(ev)
        except InputError as exc:
            log.warning("%s", exc)

    def _confirm(self, host: str, view: HostView, probe: Confirm) -> None:
        """`--confirm controller`: answer an agent's post-switch probe with a signed
        confirmation for its generation, proving the controller still reaches it."""
        if probe.source != "agent" or probe.generation != view.generation or view.done:
            return
        assert self.ctx.key is not None
        reply = sign(Confirm(host=host, generation=probe.generation, nonce=probe.nonce,
                             source="controller"), self.ctx.key)
        task = asyncio.get_running_loop().create_task(
            self._publish(self.ctx.topics.confirm(host), encode(reply)),
            name=f"confirm-{host}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _session(self, ready: asyncio.Event) -> None:
        """Keep one persistent session up, on any node of the cluster (failing over when
        ours goes away); on every (re)connect resubscribe and catch up. `ready` is set
        once the retained states and online flags have all arrived. A connection lost
        is taken up again within the broker's connect_timeout, as at start, or the
        session ends with BrokerUnavailable (`run` then stops, the rollout resumable)."""
        broker = self.ctx.broker
        failover = Failover(len(broker.addresses), backoff=Backoff(cap=5.0))
        deadline = time.monotonic() + broker.connect_timeout
        while True:
            try:
                client = await open_client(
                    broker, failover, deadline=deadline,
                    client_id=client_id("fleetctl", self.rollout_id), persistent=True,
                    queue_type=DispatchQueue.to(lambda: self._dispatch),
                    **self.ctx.client_kwargs)
                try:
                    await self._serve(client, ready)
                finally:
                    await close_client(client)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                if not ready.is_set():
                    raise BrokerUnavailable(
                        f"cannot reach the MQTT broker at {broker}: {exc}") from None
                log.warning("broker connection lost (%s); reconnecting", exc)
                deadline = time.monotonic() + broker.connect_timeout
                await asyncio.sleep(min(failover.delay(), broker.connect_timeout))
            except BrokerUnavailable as exc:
                if not ready.is_set():
                    raise
                raise type(exc)(
                    f"lost the MQTT broker mid-rollout and reconnecting failed for "
                    f"{broker.connect_timeout:g}s ({exc}); rollout {self.rollout_id} is left "
                    f"running (its hosts may still finish): continue it with `fleetctl "
                    f"rollout resume {self.rollout_id}` once the broker is back") from None
            finally:
                self._client = None
                if self._lost is not None and not self._lost.done():
                    self._lost.set_result(None)

    async def _serve(self, client: aiomqtt.Client, ready: asyncio.Event) -> None:
        self._dispatch = None  # a new connection: queued until we are ready for them
        if self.ctx.share_group and not await shared_subscription_works(
                client, self.ctx.topics, self.ctx.share_group):
            log.warning("the broker accepted the shared subscription of --share-group %s but "
                        "delivered nothing through it; using a plain subscription",
                        self.ctx.share_group)
            self.ctx.share_group = None
        self._dispatch = self._on_message  # from now on every message, inline
        self._synced.clear()
        # Known before it is published: with inline handling the marker can
        # come back before publish() returns. The retained states of every host are
        # handled inline as they arrive.
        self._marker = new_marker(self.ctx.topics)
        desired = self.ctx.topics.all_hosts("desired")
        await subscribe_and_sync(client, [*self._subscriptions(), desired], self._marker)
        async with asyncio.timeout(SYNC_TIMEOUT):
            await self._synced.wait()
        # The retained desired states are read once, for the generations they name.
        await client.unsubscribe(desired)
        if not self.ctx.share_group:
            # Caught up; without a share group every event reaches us, so the
            # live retained states (one per phase per host) are redundant.
            await client.unsubscribe(self.ctx.topics.all_hosts("state"))
        self._lost = asyncio.get_running_loop().create_future()
        self._client = client
        ready.set()
        # Handled inline; only what arrived before `_dispatch` was set (with a session
        # present, the broker sends what it queued for us right after CONNACK) comes
        # through here. Ends on disconnect.
        async for message in client.messages:
            self._on_message(message)

    async def _end_session(self) -> None:
        """Discard our persistent session on the broker (it would queue every fleet event
        for days, or for ever: an MQTT 3.1.1 session has no expiry): reconnect with the
        same client id and a clean start (MQTT 5, expiry 0) or clean session (3.1.1)."""
        with contextlib.suppress(BrokerUnavailable, aiomqtt.MqttError, OSError, TimeoutError):
            async with asyncio.timeout(5), connect(
                    self.ctx.broker, client_id=client_id("fleetctl", self.rollout_id),
                    **self.ctx.client_kwargs):
                pass

    async def _reconcile_desired(self) -> None:
        """Resume: a host given a generation whose desired state the broker does not hold
        (the controller died between the log write and the publish) gets the same
        desired again; one superseded by a newer deployment is cancelled."""
        inflight = {h: v for h, v in self.views.items()
                    if v.deployment_id is not None and v.result is None}
        if not inflight:
            return
        t = self.ctx.topics
        # the session's sync read the retained desired states (run waits for it)
        current = {h: (d.deployment_id, d.generation)
                   for h, d in self.retained_desired.items() if h in inflight}
        verdict = reconcile(inflight.values(), current, self.progress.aborted is not None)
        for h, why in verdict.superseded:
            v = inflight[h]
            v.result = v.phase = "cancelled"
            v.message = why
            self._host_status(h, "cancelled", why)
        republish = []
        for h in verdict.republish:
            v = inflight[h]
            assert v.deployment_id is not None
            republish.append((h, self._desired(h, v.deployment_id, v.generation)))
        if republish:
            log.info("re-publishing %d desired state(s) the broker did not hold", len(republish))
        await asyncio.gather(*(self._publish(t.desired(h), p, retain=True) for h, p in republish))

    # -- the loop ------------------------------------------------------------------------
    async def run(self, wait: bool = True) -> Outcome:
        if self.ctx.key is None:
            raise UsageError("no signing key: run `fleetctl keys init`")
        self.lock.acquire()
        ready = asyncio.Event()
        session = asyncio.create_task(self._session(ready), name="controller-session")
        status = "running"
        try:
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait([session, waiter], return_when=asyncio.FIRST_COMPLETED)
            if session.done():
                waiter.cancel()
                session.result()  # raises BrokerUnavailable
            if not self.created:
                self.create()
            else:
                await self._reconcile_desired()
            if self.resumed:
                self.started = time.time()  # a resumed rollout gets a fresh deadline
            status = await self._unless_broker_lost(
                session, self._drive(self.started + self.req.timeout, wait))
            if status not in ("running", "published"):
                await self._drain()
        except StateError as exc:
            if not self.created or status != "running":
                raise
            raise StateError(f"{exc}; rollout {self.rollout_id} is left running: once "
                             f"{self.log.path} takes writes again, continue it with "
                             f"`fleetctl rollout resume {self.rollout_id}`") from None
        finally:
            if self._ask_task is not None:
                self._ask_task.cancel()
            with contextlib.suppress(Exception):
                self.flush()
            await cancel_and_wait(session, BrokerUnavailable)
            finished = status not in ("running", "published")
            if finished:
                await self._end_session()
            self.lock.release(remove=finished or not self.created)
        return Outcome(self.rollout_id, status, self.views, self.started, time.time())

    @staticmethod
    async def _unless_broker_lost(session: asyncio.Task[None], work: Awaitable[str]) -> str:
        """`work`, stopped when the session ends (it ends only with BrokerUnavailable:
        the broker stayed away for its connect_timeout), which is then raised. Nothing
        is recorded for the stop: the rollout stays `running`, for `rollout resume`."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait([session, task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                await cancel_and_wait(task)
        if not task.cancelled() or not session.done():
            return task.result()
        session.result()
        raise BrokerUnavailable("the broker connection ended")  # the session never returns

    async def _drain(self, limit: float = LATE_LINES_S) -> None:
        """Before the session ends (and with it what the broker queued for us): a host
        whose outcome came from its retained state, when we (re)connected, may still
        have its last events on the way (a NATS cluster delivers a resumed session's
        queued events after the retained messages of a new subscription). They carry
        its last output lines: wait for its Result, which comes after them, for up to
        `limit` seconds. With a share group another member may receive it: no wait."""
        if self.ctx.share_group:
            return
        deadline = time.monotonic() + limit
        while self._unheard and (left := deadline - time.monotonic()) > 0:
            self._heard.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._heard.wait()
        if self._unheard:
            log.info("no Result event from %s within %.0f s: their stored logs may lack "
                     "their last lines (`fleetctl logs` shows what arrived)",
                     ", ".join(sorted(self._unheard)), limit)

    def _begin_abort(self, reason: str) -> None:
        self.progress.aborted = reason
        self.waiting_for = None
        self._record("rollout-aborting",
                     store.set_rollout_field(self.rollout_id, "abort_reason", reason))
        if self._ask_task is not None:
            self._ask_task.cancel()
        # Hosts sent a desired state that never acknowledged it lose it now (the planner
        # cancels them once it is clear they will not start); hosts not yet sent one are
        # never touched.
        for v in self.views.values():
            if v.deployment_id is not None and v.result is None and v.acked is None:
                self._withdraw(v.host)

    def _withdraw(self, host: str) -> None:
        if host not in self._cleared:
            self._cleared.add(host)
            self._to_clear.append(host)

    def _note(self, view: HostView) -> None:
        """Every change to a view the planner reads goes through here."""
        if self.planner is not None:
            self.planner.update(view)
        if self.on_host is not None:
            self.on_host(view)

    async def _drive(self, deadline: float, wait: bool) -> str:
        pr = self.progress
        planner = self.planner = Planner(self.req.rollout, self.views.values(), self.batches, pr)
        last_poll = 0.0
        while True:
            now = time.time()
            if now - last_poll >= LOG_POLL_INTERVAL:
                self._poll_log()
                last_poll = now
            actions = planner.plan(now, deadline)
            starts: list[Start] = []
            awaiting: int | None = None
            self.pause_until = None
            for a in actions:
                if isinstance(a, Start):
                    pr.attempts[a.host] = a.attempt
                    starts.append(a)
                elif isinstance(a, TimeOut):
                    self._finish_host(a.host, "timed_out", a.reason, now)
                elif isinstance(a, Skip):
                    self._finish_host(a.host, "skipped", a.reason, now)
                elif isinstance(a, Cancel):
                    self._finish_host(a.host, "cancelled", a.reason, now)
                    self._withdraw(a.host)
                elif isinstance(a, BatchDone):
                    pr.batch_done_at[a.batch] = now
                    self._record("batch-done", store.batch_done(self.rollout_id, a.batch, now))
                elif isinstance(a, Abort):
                    self._begin_abort(a.reason)
                elif isinstance(a, AwaitContinue):
                    awaiting = a.batch
                elif isinstance(a, Plan):
                    self.pause_until = a.at
            self._set_waiting(awaiting)
            self.flush()
            if self._to_clear:
                hosts, self._to_clear = self._to_clear, []
                await asyncio.gather(*(self.clear_desired(h) for h in hosts))
            if starts:
                await self._start_hosts(starts)
            if self.on_change is not None:
                self.on_change(self)
            finish = next((a for a in actions if isinstance(a, Finish)), None)
            if finish is not None:
                self.status = finish.status
                self._record("rollout-finished",
                             store.finish_rollout(self.rollout_id, finish.status))
                self.flush()
                return finish.status
            if not wait:
                return "published"
            wake = next((a.at for a in actions if isinstance(a, Plan)), now + 1.0)
            until = min(wake, deadline, now + LOG_POLL_INTERVAL)
            self._changed.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation
            # (Ctrl-C) that comes as the waited-for event completes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, until - time.time())):
                    await self._changed.wait()
            await asyncio.sleep(PLAN_INTERVAL)  # let a burst of events fold before re-planning

    def _finish_host(self, host: str, result: str, message: str, now: float) -> None:
        v = self.views[host]
        v.result, v.phase, v.message, v.finished = result, result, message, now
        self._note(v)
        self._host_status(host, result, message)

    def _set_waiting(self, batch: int | None) -> None:
        if batch == self.waiting_for:
            return
        self.waiting_for = batch
        self._record("rollout-awaiting",
                     store.set_rollout_field(self.rollout_id, "awaiting_batch", batch))
        if self._ask_task is not None:
            self._ask_task.cancel()
            self._ask_task = None
        if batch is not None and self.ask_continue is not None:
            self._ask_task = asyncio.create_task(self._ask(batch))

    async def _ask(self, batch: int) -> None:
        """An interactive yes/no (on a terminal); the event log may answer first."""
        assert self.ask_continue is not None
        answer = await self.ask_continue(self, batch)
        if answer is True:
            self.progress.continued.add(batch)
            self._record("batch-continued",
                         store.continue_batch(self.log.doc, self.rollout_id, batch))
        elif answer is False:
            self._record("abort-requested", store.request_abort(self.rollout_id, "the operator"))
            self._begin_abort("aborted by the operator")
        self._changed.set()
