"""The agent acks a QoS 1 message only after its handler returned (journal-first).

paho acks a QoS 1 PUBLISH as soon as its `on_message` returns; aiomqtt queues the
message there, so without manual acks a message the agent had not yet journaled when it
died was already acked, and the broker never sent it again: a deployment lost. Real
Mosquitto, a persistent session resumed under the same client id.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt
import pytest

from client.receive.session import AgentSession, Retained
from controller.mqtt.broker import Mosquitto
from protocol.broker import parse_broker_url
from protocol.errors import FlotillaError
from protocol.mqtt import ManualAck

TOPIC = "fleet/v1/host/h1/answer"


async def publish(broker: Mosquitto, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="pub") as client:
        await client.publish(TOPIC, payload, qos=1)


async def run_session(broker: Mosquitto, seen: asyncio.Queue[bytes], *,
                      finish: bool) -> tuple[AgentSession, asyncio.Task[None]]:
    """A session on TOPIC whose handler records each message and returns only if
    `finish` (else it hangs, as an agent does that dies before its fsync)."""
    async def handler(message: aiomqtt.Message) -> None:
        seen.put_nowait(bytes(message.payload))  # type: ignore[arg-type]
        if not finish:
            await asyncio.Event().wait()

    session = AgentSession(parse_broker_url(broker.url), "agent-h1", [(TOPIC, 1)], handler,
                           Retained("fleet/v1/host/h1/online", b""))
    task = asyncio.create_task(session.run())
    await asyncio.wait_for(session.connected.wait(), 10)
    return session, task


async def end(session: AgentSession, task: asyncio.Task[None]) -> None:
    await session.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_message_whose_handler_never_returned_is_delivered_again(
        broker: Mosquitto) -> None:
    seen: asyncio.Queue[bytes] = asyncio.Queue()
    session, task = await run_session(broker, seen, finish=False)
    await publish(broker, b"answer-1")
    assert await asyncio.wait_for(seen.get(), 10) == b"answer-1"
    await end(session, task)  # gone before the handler returned: nothing was acked

    again: asyncio.Queue[bytes] = asyncio.Queue()
    session, task = await run_session(broker, again, finish=True)
    try:
        assert await asyncio.wait_for(again.get(), 10) == b"answer-1"
    finally:
        await end(session, task)


async def test_a_handled_message_is_not_delivered_again(broker: Mosquitto) -> None:
    seen: asyncio.Queue[bytes] = asyncio.Queue()
    session, task = await run_session(broker, seen, finish=True)
    await publish(broker, b"answer-1")
    assert await asyncio.wait_for(seen.get(), 10) == b"answer-1"
    await end(session, task)

    again: asyncio.Queue[bytes] = asyncio.Queue()
    session, task = await run_session(broker, again, finish=True)
    try:
        await publish(broker, b"answer-2")  # what arrives next is the new one only
        assert await asyncio.wait_for(again.get(), 10) == b"answer-2"
        assert again.empty()
    finally:
        await end(session, task)


async def test_an_aiomqtt_without_the_paho_client_fails_with_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    monkeypatch.delattr(client, "_client")
    with pytest.raises(FlotillaError, match=r"install aiomqtt 2\.5"):
        ManualAck(client)
