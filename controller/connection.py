"""The controller's MQTT edge: connecting, and reading retained topics to the end.

Every aiomqtt failure leaving this module is a BrokerUnavailable (exit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.broker import SESSION_EXPIRY_S, BrokerAddress
from protocol.errors import BrokerUnavailable
from protocol.topics import Topics


def make_client(address: BrokerAddress, client_id: str | None = None, persistent: bool = False,
                timeout: float = 5.0, **extra: Any) -> aiomqtt.Client:
    kwargs: dict[str, Any] = {}
    if persistent:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        kwargs = {"clean_start": False, "properties": props}
    client = aiomqtt.Client(
        **address.client_kwargs(), **extra, **kwargs,
        identifier=client_id or f"fleetctl-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5, timeout=timeout,
        max_inflight_messages=1000,
    )
    client.pending_calls_threshold = 1_000_000  # we bound concurrency ourselves
    return client


@contextlib.asynccontextmanager
async def connect(address: BrokerAddress, **kwargs: Any) -> AsyncIterator[aiomqtt.Client]:
    try:
        async with make_client(address, **kwargs) as client:
            yield client
    except aiomqtt.MqttError as exc:
        raise BrokerUnavailable(f"cannot reach the MQTT broker at {address}: {exc}") from None


async def sync_marker(client: aiomqtt.Client, topics: Topics) -> str:
    """Subscribe to a unique marker topic and publish to it; when it comes back, every
    retained message of earlier subscriptions has been delivered (broker order)."""
    marker = f"{topics.prefix}/controller/sync/{uuid.uuid4().hex}"
    await client.subscribe(marker, qos=1)
    await client.publish(marker, b"sync", qos=1)
    return marker


async def read_retained(client: aiomqtt.Client, topics: Topics, filters: list[str],
                        timeout: float = 10.0) -> list[aiomqtt.Message]:
    """All retained messages on `filters`, without guessing with an idle timeout."""
    for f in filters:
        await client.subscribe(f, qos=1)
    marker = await sync_marker(client, topics)
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
    for f in [*filters, marker]:
        await client.unsubscribe(f)
    return out
