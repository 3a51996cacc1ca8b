"""The floor of `bench/fanout.py`: bare aiomqtt agents that ack a retained message.

Each agent is one MQTT 5 (or 3.1.1) connection (TCP_NODELAY, like Flotilla's) that subscribes
(QoS1) to its own `PREFIX/host/H/desired`, publishes a retained `online` and, for every
non-empty message on `desired`, publishes one QoS1 ack on `PREFIX/host/H/events` and
waits for its PUBACK. No journal, no pydantic, no signature: what any MQTT fan-out
costs on this machine with this broker, the lower bound Flotilla is compared with.

    python bench/floor_agents.py --broker mqtt://127.0.0.1:1883 --hosts-file F

`--protocol flotilla` is the *protocol floor*: the same bare agents send, for every
desired state, the packets a Flotilla agent sends for a quick deploy, with payloads of
their sizes and no work in between: SUBSCRIBE `answer` (QoS1), Ack (QoS1), the confirm
probe out and back (QoS0), Result (QoS1), the retained HostState (QoS1), UNSUBSCRIBE
`answer`. Idle subscriptions are QoS 0, as Flotilla's are. What Flotilla costs above it
is its own logic; what this costs above the plain floor is the protocol's.

`--protocol lean` is a protocol Flotilla does not speak, measured to size one that
would: per desired state only two retained HostStates (QoS 1), "acked" and the final
one carrying the result, and nothing else (no `answer` subscription unless a prompt
opens, no separate Ack and Result events, no probe: the final state's PUBACK is the
round trip). The controller reads `state`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protocol.mqtt import Backoff, subscribe_until_granted

CONNECT_CONCURRENCY = 100
# MQTT 5 unless FLEET_MQTT_VERSION says 3.1.1 (NATS), like every Flotilla client.
PROTOCOL = (aiomqtt.ProtocolVersion.V311 if os.environ.get("FLEET_MQTT_VERSION") == "3.1.1"
            else aiomqtt.ProtocolVersion.V5)
ACK_PAYLOAD = b"\x83\xa1v\x01\xa4type\xa3ack\xa4body" + b"\x00" * 96  # ~ an encoded Ack
# The protocol floor's messages, the sizes of Flotilla's for a quick deploy (a Result
# carries the deploy's output lines); the first byte tells the floor controller which.
PROTOCOL_ACK = b"A" + ACK_PAYLOAD[1:]
PROTOCOL_RESULT = b"R" + b"\x00" * 880
PROTOCOL_STATE = b"S" + b"\x00" * 370
PROTOCOL_CONFIRM = b"C" + b"\x00" * 120


async def subscribe(client: aiomqtt.Client, topic: str, host: str, qos: int = 1) -> None:
    """Subscribe until the broker grants it, as Flotilla's agent does: a busy NATS
    cluster refuses a SUBSCRIBE (SUBACK 0x80) when creating its JetStream consumer
    times out, and an agent that carried on would never see its message (the floor's
    fan-out would wait forever)."""
    def refused(topics: list[str], delay: float) -> None:
        print(f"floor agent {host}: broker refused the subscription to {topic}; "
              f"retrying in {delay:.1f}s", file=sys.stderr)

    await subscribe_until_granted(client, [(topic, qos)], Backoff(base=0.5, cap=10.0),
                                  on_refused=refused)


async def flotilla_packets(client: aiomqtt.Client, base: str, host: str,
                           confirmed: asyncio.Queue[None]) -> None:
    """One quick deploy's packets, in Flotilla's order, with nothing done in between.
    Like `AgentSession.want`, the Ack goes once the SUBSCRIBE is queued, without waiting
    for its SUBACK."""
    answer = asyncio.ensure_future(subscribe(client, f"{base}/answer", host))
    await asyncio.sleep(0)  # the SUBSCRIBE is queued on the connection
    await client.publish(f"{base}/events", PROTOCOL_ACK, qos=1)
    await client.publish(f"{base}/confirm", PROTOCOL_CONFIRM, qos=0)
    await confirmed.get()
    await client.publish(f"{base}/events", PROTOCOL_RESULT, qos=1)
    await client.publish(f"{base}/state", PROTOCOL_STATE, qos=1, retain=True)
    await answer
    await client.unsubscribe(f"{base}/answer")


async def lean_packets(client: aiomqtt.Client, base: str) -> None:
    await client.publish(f"{base}/state", PROTOCOL_ACK, qos=1, retain=True)
    await client.publish(f"{base}/state", PROTOCOL_RESULT, qos=1, retain=True)


async def agent(host: str, broker: tuple[str, int], prefix: str,
                connect_sem: asyncio.Semaphore, stop: asyncio.Event,
                protocol: str = "floor") -> None:
    base = f"{prefix}/host/{host}"
    deploys: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        try:
            client = aiomqtt.Client(
                hostname=broker[0], port=broker[1], identifier=f"floor-{host}",
                protocol=PROTOCOL, keepalive=30, timeout=30,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                will=aiomqtt.Will(f"{base}/online", b"offline", qos=1, retain=True))
            async with connect_sem:
                await client.__aenter__()
            try:
                confirmed: asyncio.Queue[None] = asyncio.Queue()
                if protocol == "flotilla":
                    await subscribe(client, f"{base}/desired", host, qos=0)
                    await subscribe(client, f"{base}/confirm", host, qos=0)
                elif protocol == "lean":
                    await subscribe(client, f"{base}/desired", host, qos=0)
                else:
                    await subscribe(client, f"{base}/desired", host)
                await client.publish(f"{base}/online", b"online", qos=1, retain=True)
                async for message in client.messages:
                    if not message.payload:
                        continue
                    if protocol == "floor":
                        await client.publish(f"{base}/events", ACK_PAYLOAD, qos=1)
                    elif str(message.topic).endswith("/confirm"):
                        confirmed.put_nowait(None)
                    else:
                        task = asyncio.create_task(
                            flotilla_packets(client, base, host, confirmed)
                            if protocol == "flotilla" else lean_packets(client, base))
                        deploys.add(task)
                        task.add_done_callback(deploys.discard)
            finally:
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
        except aiomqtt.MqttError as exc:
            if stop.is_set():
                return
            print(f"floor agent {host}: {exc}; reconnecting", file=sys.stderr)
            await asyncio.sleep(0.5)


async def serve(hosts: list[str], broker: tuple[str, int], prefix: str,
                protocol: str = "floor") -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tasks = [asyncio.create_task(agent(h, broker, prefix, sem, stop, protocol))
             for h in hosts]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    p.add_argument("--hosts-file", type=Path, required=True, help="one host name a line")
    p.add_argument("--prefix", default="fleet/v1")
    p.add_argument("--protocol", choices=["floor", "flotilla", "lean"], default="floor",
                   help="one ack per message, a quick Flotilla deploy's packets, or two "
                        "retained states")
    args = p.parse_args(argv)
    hostport = args.broker.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    hosts = [h for h in args.hosts_file.read_text().split() if h]
    asyncio.run(serve(hosts, (host, int(port)), args.prefix, args.protocol))
    return 0


if __name__ == "__main__":
    sys.exit(main())
