"""The controller's MQTT edge: connecting (to any node of a cluster), probing what the
broker can do, and reading retained topics to the end.

Every aiomqtt failure leaving this module is a BrokerUnavailable (exit 3); a refusal no
retry can fix (MQTT version, credentials, authorization) is a BrokerRefused, raised at
once with the fix in its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiomqtt

from protocol.broker import BrokerAddress, BrokerCluster
from protocol.errors import BrokerUnavailable
from protocol.mqtt import (
    Backoff,
    Failover,
    attempt_failure,
    raise_if_refused,
    random_client_id,
    subscribe_until_granted,
    unreachable,
)
from protocol.topics import Topics

log = logging.getLogger(__name__)
SHARE_PROBE_TIMEOUT = 3.0
# Catching up on every host's retained messages: at 10,000 hosts on a busy machine they
# take seconds to arrive, and a PUBACK or SUBACK sent after them waits behind them.
SYNC_TIMEOUT = 60.0
SUBSCRIBE_ATTEMPTS = 6  # ~0.5+1+2+4+8 s of backoff before a refused subscription is fatal
OPERATION_TIMEOUT = 5.0  # aiomqtt's wait for a CONNACK, SUBACK or UNSUBACK
LAST_ATTEMPT_MIN = 0.5  # a node tried at the deadline still gets this long to answer


def make_client(broker: BrokerCluster, address: BrokerAddress | None = None,
                client_id: str | None = None, persistent: bool = False,
                timeout: float = OPERATION_TIMEOUT, **extra: Any) -> aiomqtt.Client:
    """An unconnected client for one node (default: the first) of `broker`."""
    client = aiomqtt.Client(
        **broker.client_kwargs(address or broker.addresses[0],
                               client_id or random_client_id("fleetctl"), persistent),
        **extra, timeout=timeout, max_inflight_messages=1000,
    )
    client.pending_calls_threshold = 1_000_000  # we bound concurrency ourselves
    return client


async def open_client(broker: BrokerCluster, failover: Failover | None = None,
                      deadline: float | None = None, **kwargs: Any) -> aiomqtt.Client:
    """A connected client on the first node that answers, in `failover` order (a fresh
    Failover: the listed order). Rounds over every node are separated by capped,
    jittered backoff until `deadline` (monotonic; None: the broker's connect_timeout
    from now), then BrokerUnavailable. Refusals raise BrokerRefused at once.

    A node that accepts the connection and never answers (frozen, or a firewall that
    swallows MQTT) holds an attempt only until the deadline, not for a whole
    `timeout`: the wait for its CONNACK is cut to what is left (at least
    LAST_ATTEMPT_MIN)."""
    failover = failover or Failover(len(broker.addresses), backoff=Backoff(cap=2.0))
    if deadline is None:
        deadline = time.monotonic() + broker.connect_timeout
    timeout = kwargs.pop("timeout", OPERATION_TIMEOUT)
    # each node's last failure, in the listed order (every round tries every node)
    failures = dict.fromkeys(map(str, broker.addresses), "not tried")
    while True:
        for index in failover.round():
            address = broker.addresses[index]
            wait = min(timeout, max(LAST_ATTEMPT_MIN, deadline - time.monotonic()))
            client = make_client(broker, address, timeout=wait, **kwargs)
            began = time.monotonic()
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                raise_if_refused(exc, broker.mqtt, str(address))
                log.debug("broker %s did not answer: %s", address, exc)
                failures[str(address)] = attempt_failure(
                    str(exc), time.monotonic() - began, wait)
                continue
            client.timeout = timeout  # later SUBACKs and UNSUBACKs get the full wait
            failover.connected(index)
            return client
        delay = failover.delay()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable(unreachable(failures))
        await asyncio.sleep(min(delay, remaining))  # one last round at the deadline


async def close_client(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
        await client.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def connect(broker: BrokerCluster, **kwargs: Any) -> AsyncIterator[aiomqtt.Client]:
    """A connection for one command: the first node that answers within the broker's
    connect_timeout; a connection lost meanwhile is a BrokerUnavailable."""
    client = await open_client(broker, **kwargs)
    try:
        yield client
    except aiomqtt.MqttError as exc:
        raise BrokerUnavailable(f"lost the MQTT broker connection ({broker}): {exc}") from None
    finally:
        await close_client(client)


async def while_connected(broker: BrokerCluster,
                          follow: Callable[[aiomqtt.Client], Awaitable[bool]],
                          **kwargs: Any) -> None:
    """Run `follow` on a connection until it returns True (done), for a command that
    lasts (`watch`, `logs --follow`). A connection lost meanwhile (MqttError, or `follow`
    returning False) is taken up again on any node, in failover order, after capped,
    jittered backoff; `follow` then catches up itself. No node within connect_timeout:
    BrokerUnavailable; a refusal: BrokerRefused."""
    failover = Failover(len(broker.addresses), backoff=Backoff(cap=5.0))
    while True:
        client = await open_client(broker, failover, **kwargs)
        try:
            if await follow(client):
                return
            lost: object = "the broker closed the connection"
        except aiomqtt.MqttError as exc:
            lost = exc
        finally:
            await close_client(client)
        log.warning("broker connection lost (%s); reconnecting", lost)
        await asyncio.sleep(failover.delay())


async def subscribe(client: aiomqtt.Client, topic: str | list[str], qos: int = 1,
                    timeout: float | None = None) -> None:
    """Subscribe (a list: in one SUBSCRIBE), and make sure the broker granted it:
    aiomqtt returns a SUBACK failure instead of raising, and a busy NATS cluster sends
    one when creating the JetStream consumer behind the subscription times out. What
    was refused is asked again with backoff; still refused after SUBSCRIBE_ATTEMPTS, it
    is a BrokerUnavailable (a controller that carried on would silently miss every
    message on that topic)."""
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    topics = [topic] if isinstance(topic, str) else list(topic)

    def refused(todo: list[str], delay: float) -> None:
        log.warning("the broker refused the subscription to %s; retrying in %.1fs",
                    ", ".join(todo), delay)

    todo = await subscribe_until_granted(client, [(t, qos) for t in topics],
                                         Backoff(base=0.5, cap=8.0),
                                         attempts=SUBSCRIBE_ATTEMPTS, on_refused=refused,
                                         **kwargs)
    if todo:
        raise BrokerUnavailable(f"the broker refused the subscription to {', '.join(todo)} "
                                f"{SUBSCRIBE_ATTEMPTS} times (SUBACK failure)")


async def shared_subscription_works(client: aiomqtt.Client, topics: Topics, group: str,
                                    timeout: float = SHARE_PROBE_TIMEOUT) -> bool:
    """Does the broker deliver through `$share/GROUP/...`? Subscribe a shared filter to
    a private probe topic and publish one message to it. Some brokers accept the
    subscription and deliver nothing (NATS); the caller then falls back to a plain
    subscription. Call before other subscriptions (their messages are not consumed)."""
    probe = f"{topics.prefix}/controller/probe/{uuid.uuid4().hex}"
    shared = topics.shared(group, probe)
    await client.subscribe(shared, qos=1)
    await client.publish(probe, b"probe", qos=1)

    async def arrived() -> None:
        async for message in client.messages:
            if str(message.topic) == probe:
                return

    try:
        await asyncio.wait_for(arrived(), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(shared)


def new_marker(topics: Topics) -> str:
    return f"{topics.prefix}/controller/sync/{uuid.uuid4().hex}"


async def subscribe_and_sync(client: aiomqtt.Client, filters: list[str], marker: str,
                             timeout: float = SYNC_TIMEOUT) -> None:
    """Subscribe to `filters` and the unique `marker` topic (`new_marker`), then publish
    to the marker: when it comes back, every retained message of the filters has been
    delivered (broker order). One SUBSCRIBE for all, so its SUBACK comes before any
    retained message; one SUBSCRIBE each would make every later SUBACK (and the
    marker's PUBACK) wait behind the retained messages of the filters before it."""
    await subscribe(client, [*filters, marker], timeout=timeout)
    await client.publish(marker, b"sync", qos=1, timeout=timeout)


async def read_retained(client: aiomqtt.Client, topics: Topics, filters: list[str],
                        timeout: float = SYNC_TIMEOUT) -> list[aiomqtt.Message]:
    """All retained messages on `filters`, without guessing with an idle timeout."""
    marker = new_marker(topics)
    await subscribe_and_sync(client, filters, marker, timeout)
    out = await messages_until(client, marker, timeout)
    for f in [*filters, marker]:
        await client.unsubscribe(f)
    return out


async def messages_until(client: aiomqtt.Client, marker: str, timeout: float = SYNC_TIMEOUT
                         ) -> list[aiomqtt.Message]:
    """The messages that arrive before the `marker` of `subscribe_and_sync` comes back:
    every retained message of its filters (and whatever else was delivered meanwhile)."""
    out: list[aiomqtt.Message] = []

    async def collect() -> None:
        async for message in client.messages:
            if str(message.topic) == marker:
                return
            out.append(message)

    try:
        await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        raise BrokerUnavailable("the broker did not answer in time") from None
    return out
