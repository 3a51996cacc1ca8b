"""The agent's MQTT session: persistent, self-healing, journal-first acking.

- A persistent session (MQTT 5: clean_start=False and a SessionExpiryInterval; MQTT
  3.1.1: clean_session=False; built by `protocol.mqtt`), so QoS1 messages sent while
  the agent is away wait for it in the broker.
- aiomqtt does not reconnect: `run()` loops on MqttError. With a cluster (several
  broker addresses) it fails over to the next node, whose copy of the session it
  resumes; a round in which no node answers is followed by capped, jittered backoff.
- A refusal no retry can fix (MQTT version, credentials, authorization) ends `run()`
  with BrokerRefused, whose message names the fix; the agent exits non-zero.
- A subscription the broker refuses (SUBACK failure) is asked for again with backoff.
- Subscriptions can be taken and dropped while the session runs (`want`, `unwant`): the
  agent holds its queued (QoS 1) `answer` subscription only while a deployment is
  active, so an idle host costs the broker no queue (on NATS: no JetStream consumer).
- Manual acks: a QoS1 message is acknowledged only after its handler returned (the
  handler journals with fsync first), so a crash in between means redelivery.
- `publish()` waits for a connection and retries across reconnects.
- Latest-value topics (`retry_latest`, QoS 0: the broker redelivers them only on a
  re-subscribe) are never dropped by a handler that fails: the message is handled again,
  with backoff, until the handler returns (it journaled or refused it with a reason) or
  a newer message on that topic replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiomqtt

from protocol.broker import BrokerAddress, BrokerCluster
from protocol.mqtt import (
    Backoff,
    Failover,
    ManualAck,
    attempt_failure,
    publish_until_lost,
    raise_if_refused,
    subscribe_until_granted,
    unreachable,
)

log = logging.getLogger(__name__)
Handler = Callable[[aiomqtt.Message], Awaitable[None]]


@dataclass(frozen=True)
class Retained:
    topic: str
    payload: bytes


class AgentSession:
    """Owns one MQTT connection for one host; reconnects until stopped."""

    def __init__(
        self,
        broker: BrokerCluster | BrokerAddress,
        client_id: str,
        subscriptions: list[tuple[str, int]],
        handler: Handler,
        will: Retained,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        extra_client_kwargs: dict[str, Any] | None = None,
        retry_latest: tuple[str, ...] = (),
        stale: tuple[str, ...] = (),
    ) -> None:
        self.broker = BrokerCluster.of(broker)  # a BrokerAddress is a one-node cluster
        self.client_id = client_id
        self.subscriptions = dict(subscriptions)  # topic -> QoS, held across reconnects
        self.handler = handler
        self.will = will
        self.on_connect = on_connect
        self.extra = extra_client_kwargs or {}
        self.failover = Failover(len(self.broker.addresses))
        self.connected = asyncio.Event()
        self._lost: asyncio.Future[None] | None = None  # resolves when this connection ends
        self.connections = 0
        self._client: aiomqtt.Client | None = None
        self._stopping = False
        self.retry_latest = set(retry_latest)
        self._retries: dict[str, asyncio.Task[None]] = {}
        self.retry_backoff = Backoff(base=0.5, cap=30.0)
        self._granted: set[str] = set()  # subscribed on the live connection
        self._granted_changed = asyncio.Event()  # also set at each refusal
        self.refusals: dict[str, int] = {}  # SUBACK failures of a wanted topic, in a row
        # To unsubscribe on the next connection: `stale` ones an earlier run of this
        # persistent session may have left on the broker, and those dropped offline.
        self._drop: set[str] = set(stale)
        self._tasks: set[asyncio.Task[None]] = set()

    def _make_client(self, address: BrokerAddress) -> tuple[aiomqtt.Client, ManualAck]:
        client = aiomqtt.Client(
            **self.broker.client_kwargs(address, self.client_id, persistent=True),
            **self.extra,
            keepalive=30,
            will=aiomqtt.Will(self.will.topic, self.will.payload, qos=1, retain=True),
        )
        return client, ManualAck(client)

    async def _open(self) -> tuple[aiomqtt.Client, ManualAck]:
        """Connect to the first node that answers (failover order); until stopped."""
        while True:
            failures: dict[str, str] = {}
            for index in self.failover.round():
                address = self.broker.addresses[index]
                client, acks = self._make_client(address)
                began = time.monotonic()
                try:
                    await client.__aenter__()
                except aiomqtt.MqttError as exc:
                    raise_if_refused(exc, self.broker.mqtt, str(address))
                    failures[str(address)] = attempt_failure(
                        str(exc), time.monotonic() - began, client.timeout)
                    continue
                if self.failover.current not in (None, index):
                    log.info("%s: failed over to %s", self.client_id, address)
                self.failover.connected(index)
                return client, acks
            delay = self.failover.delay()
            log.warning("%s: %s; retry in %.1fs", self.client_id, unreachable(failures), delay)
            await asyncio.sleep(delay)

    async def run(self) -> None:
        """Connect, subscribe, dispatch; reconnect (fail over) until `stop()`."""
        while not self._stopping:
            try:
                client, acks = await self._open()
                try:
                    self._client = client
                    self.connections += 1
                    self._granted.clear()
                    while pending := [(t, q) for t, q in self.subscriptions.items()
                                      if t not in self._granted]:
                        for topic, qos in pending:
                            await self._subscribe(client, topic, qos)
                    for topic in sorted(self._drop):
                        await self._unsubscribe(client, topic)
                    self._lost = asyncio.get_running_loop().create_future()
                    self.connected.set()
                    if self.on_connect is not None:
                        await self.on_connect()
                    async for message in client.messages:
                        await self._dispatch(acks, message)
                finally:
                    with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                        await client.__aexit__(None, None, None)
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    break
                delay = self.failover.delay()
                log.warning("%s: broker connection lost (%s); reconnecting in %.1fs",
                            self.client_id, exc, delay)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self._granted.clear()
                if self._lost is not None and not self._lost.done():
                    self._lost.set_result(None)
                self._client = None

    async def _subscribe(self, client: aiomqtt.Client, topic: str, qos: int) -> None:
        """Subscribe until the broker grants it (capped, jittered backoff, no limit), or
        until the topic is dropped (`unwant`) meanwhile."""
        def still_wanted(t: str, q: int) -> bool:
            return self.subscriptions.get(t) == q

        def refused(topics: list[str], delay: float) -> None:
            log.warning("%s: the broker refused the subscription to %s; retrying in %.1fs",
                        self.client_id, ", ".join(topics), delay)
            for t in topics:
                self.refusals[t] = self.refusals.get(t, 0) + 1
            self._granted_changed.set()  # whoever waits for it may say so

        await subscribe_until_granted(client, [(topic, qos)], Backoff(base=0.5, cap=30.0),
                                      wanted=still_wanted, on_refused=refused)
        self.refusals.pop(topic, None)
        if self.subscriptions.get(topic) == qos:
            self._granted.add(topic)
            self._granted_changed.set()

    async def _unsubscribe(self, client: aiomqtt.Client, topic: str) -> None:
        self._drop.discard(topic)
        try:
            await client.unsubscribe(topic)
        except BaseException:
            if topic not in self.subscriptions:
                self._drop.add(topic)  # still to do, on the next connection
            raise

    async def want(self, topic: str, qos: int) -> None:
        """Hold this subscription from now on, across reconnects. When connected, return
        once the SUBSCRIBE is queued on the connection (not granted: see `subscribed`),
        so that it goes out before anything published after this call."""
        if self.subscriptions.get(topic) == qos:
            return
        self.subscriptions[topic] = qos
        self._drop.discard(topic)
        client = self._client
        if client is not None and self.connected.is_set():
            self._background(self._subscribe(client, topic, qos))
            # One turn of the loop: the new task runs up to its first wait, and aiomqtt's
            # subscribe() hands the packet to paho before its first wait.
            await asyncio.sleep(0)

    def unwant(self, topic: str) -> None:
        """Drop this subscription (also from the broker's copy of a persistent session,
        on the next connection if not now): what it would queue is of no use any more."""
        if self.subscriptions.pop(topic, None) is None:
            return
        self._granted.discard(topic)
        client = self._client
        if client is not None and self.connected.is_set():
            self._background(self._unsubscribe(client, topic))
        else:
            self._drop.add(topic)

    async def subscribed(self, topic: str,
                         refused: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Until the broker granted `topic` (a `want`ed one) on the live connection;
        `refused(n)` is awaited each time the broker refused it (n: times in a row)."""
        told = 0
        while topic not in self._granted:
            self._granted_changed.clear()
            count = self.refusals.get(topic, 0)
            if refused is not None and count > told:
                told = count
                await refused(count)
                continue
            await self._granted_changed.wait()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            with contextlib.suppress(aiomqtt.MqttError):  # the next connection redoes it
                await coro
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, acks: ManualAck, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        superseded = self._retries.pop(topic, None)
        if superseded is not None:
            superseded.cancel()
        try:
            await self.handler(message)
        except aiomqtt.MqttError:
            raise
        except Exception:  # a handler bug must not kill the session; nothing is acked
            log.exception("%s: handler failed for %s", self.client_id, message.topic)
            if topic in self.retry_latest:
                self._retries[topic] = asyncio.create_task(self._retry(topic, message),
                                                           name=f"retry-{topic}")
            return
        if message.qos > 0:
            acks.ack(message)

    async def _retry(self, topic: str, message: aiomqtt.Message) -> None:
        """Handle `message` again until the handler returns (cancelled by a newer one)."""
        backoff = Backoff(self.retry_backoff.base, self.retry_backoff.cap)
        try:
            while True:
                delay = backoff.next_delay()
                log.warning("%s: handling %s again in %.1fs", self.client_id, topic, delay)
                await asyncio.sleep(delay)
                try:
                    await self.handler(message)
                    log.info("%s: %s handled on retry %d", self.client_id, topic,
                             backoff.attempt)
                    return
                except aiomqtt.MqttError as exc:
                    log.warning("%s: retry of %s: broker error (%s)", self.client_id, topic, exc)
                except Exception as exc:
                    log.warning("%s: retry of %s failed: %s", self.client_id, topic, exc)
        finally:
            if self._retries.get(topic) is asyncio.current_task():
                del self._retries[topic]

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish, waiting for a connection and retrying across reconnects.

        aiomqtt waits for a PUBACK until its timeout even when the connection is gone, so
        each attempt also watches the connection and retries as soon as it drops."""
        while True:
            await self.connected.wait()
            client, lost = self._client, self._lost
            if client is None or lost is None:
                await asyncio.sleep(0.05)
                continue
            try:
                if await publish_until_lost(client, lost, topic, payload, qos=qos,
                                            retain=retain):
                    return
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    raise
                log.debug("%s: publish to %s failed (%s); retrying", self.client_id,
                          topic, exc)
            await asyncio.sleep(0.1)

    async def stop(self, graceful_payload: bytes | None = None) -> None:
        """Publish the offline marker ourselves (a clean DISCONNECT suppresses the will)."""
        client = self._client
        if client is not None and graceful_payload is not None:
            try:
                await client.publish(self.will.topic, graceful_payload, qos=1, retain=True,
                                     timeout=2)
            except aiomqtt.MqttError:
                pass
        self._stopping = True
        for task in [*self._retries.values(), *self._tasks]:
            task.cancel()
