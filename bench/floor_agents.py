"""The floor of `bench/fanout.py`: bare aiomqtt agents that ack a retained message.

Each agent is one MQTT 5 (or 3.1.1) connection (TCP_NODELAY, like Flotilla's) that subscribes
(QoS1) to its own `PREFIX/host/H/desired`, publishes a retained `online` and, for every
non-empty message on `desired`, publishes one QoS1 ack on `PREFIX/host/H/events` and
waits for its PUBACK. No journal, no pydantic, no signature: what any MQTT fan-out
costs on this machine with this broker, the lower bound Flotilla is compared with.

    python bench/floor_agents.py --broker mqtt://127.0.0.1:1883 --hosts-file F
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
from protocol.mqtt import refused_subscriptions

CONNECT_CONCURRENCY = 100
# MQTT 5 unless FLEET_MQTT_VERSION says 3.1.1 (NATS), like every Flotilla client.
PROTOCOL = (aiomqtt.ProtocolVersion.V311 if os.environ.get("FLEET_MQTT_VERSION") == "3.1.1"
            else aiomqtt.ProtocolVersion.V5)
ACK_PAYLOAD = b"\x83\xa1v\x01\xa4type\xa3ack\xa4body" + b"\x00" * 96  # ~ an encoded Ack


async def subscribe(client: aiomqtt.Client, topic: str, host: str) -> None:
    """Subscribe until the broker grants it: a busy NATS cluster refuses a SUBSCRIBE
    (SUBACK 0x80) when creating its JetStream consumer times out, and an agent that
    carried on would never see its message (the floor's fan-out would wait forever)."""
    delay = 0.5
    while refused_subscriptions([topic], await client.subscribe(topic, qos=1)):
        print(f"floor agent {host}: broker refused the subscription to {topic}; "
              f"retrying in {delay:.1f}s", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def agent(host: str, broker: tuple[str, int], prefix: str,
                connect_sem: asyncio.Semaphore, stop: asyncio.Event) -> None:
    base = f"{prefix}/host/{host}"
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
                await subscribe(client, f"{base}/desired", host)
                await client.publish(f"{base}/online", b"online", qos=1, retain=True)
                async for message in client.messages:
                    if message.payload:
                        await client.publish(f"{base}/events", ACK_PAYLOAD, qos=1)
            finally:
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
        except aiomqtt.MqttError as exc:
            if stop.is_set():
                return
            print(f"floor agent {host}: {exc}; reconnecting", file=sys.stderr)
            await asyncio.sleep(0.5)


async def serve(hosts: list[str], broker: tuple[str, int], prefix: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tasks = [asyncio.create_task(agent(h, broker, prefix, sem, stop)) for h in hosts]
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
    args = p.parse_args(argv)
    hostport = args.broker.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    hosts = [h for h in args.hosts_file.read_text().split() if h]
    asyncio.run(serve(hosts, (host, int(port)), args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
