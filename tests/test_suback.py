"""Issue 13: a subscription the broker refuses (SUBACK failure) is not taken as granted.

aiomqtt's `subscribe()` returns the SUBACK codes and raises on none of them. A busy NATS
cluster refuses a SUBSCRIBE when creating its JetStream consumer times out (seen at 100
simulated hosts on a 3-node cluster: `bench/fanout.py --broker nats-cluster` then waited
forever for hosts that never got their message). Here a real NATS node refuses through its
user permissions (a denied subject gets the same SUBACK failure; Mosquitto grants
every subscription and filters on delivery), and later allows it (configuration reloaded
on SIGHUP), as a cluster that has caught up would.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from client.receive.session import AgentSession, Retained
from controller.mqtt import connection
from controller.mqtt.broker import (
    NATS_INSTALL,
    NatsNode,
    NatsNodeConfig,
    free_port,
    mqtt_connack,
    nats_binary,
)
from protocol.broker import BrokerCluster
from protocol.errors import BrokerUnavailable
from protocol.mqtt import random_client_id, refused_subscriptions

DESIRED = "fleet/v1/host/h1/desired"
DENIED = "fleet/v1/host/h2/desired"


def users(deny: list[str]) -> str:
    """A NATS user whose permissions deny subscribing to `deny` (MQTT topics)."""
    subjects = ", ".join(f'"{t.replace("/", ".")}"' for t in deny)
    return ("authorization {\n  users = [ { user: agent, password: secret,\n"
            f"    permissions: {{ subscribe: {{ deny: [{subjects}] }} }} }} ]\n}}\n")


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsNode]:
    if nats_binary() is None:
        pytest.fail(f"nats-server is not installed: install it with '{NATS_INSTALL}'")
    config = NatsNodeConfig(name="suback", store_dir=tmp_path / "js", client_port=free_port(),
                            mqtt_port=free_port(), extra=users([DESIRED, DENIED]))
    node = NatsNode(tmp_path, config)
    node.launch()
    try:
        deadline = time.monotonic() + 30
        while mqtt_connack("127.0.0.1", config.mqtt_port) not in (0, 4, 5):
            assert time.monotonic() < deadline, "NATS did not serve MQTT"
            time.sleep(0.1)
        yield node
    finally:
        node.stop()


class Seen(logging.Handler):
    """Sets `seen` once a log record containing `text` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text, self.seen = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def cluster_of(node: NatsNode) -> BrokerCluster:
    return BrokerCluster.parse(f"mqtt://agent:secret@127.0.0.1:{node.config.mqtt_port}",
                               "3.1.1")


async def test_the_agent_subscribes_again_until_the_broker_grants_it(
        nats: NatsNode) -> None:
    cluster = cluster_of(nats)
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(m: aiomqtt.Message) -> None:
        await got.put(bytes(m.payload))  # type: ignore[arg-type]

    session = AgentSession(cluster, "agent-h1", [(DESIRED, 1)], handler,
                           Retained("fleet/v1/host/h1/online", b""))
    refused = Seen("refused the subscription")
    logging.getLogger("client.receive.session").addHandler(refused)
    task = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(refused.seen.wait(), 30)
        assert not session.connected.is_set()  # not serving while deaf to its desired
        # Allowed from now on (NATS reloads its configuration on SIGHUP), as a busy
        # cluster that has caught up creates the consumer it timed out on before.
        conf = nats.workdir / f"{nats.config.name}.conf"
        conf.write_text(conf.read_text().replace(f'"{DESIRED.replace("/", ".")}", ', ""))
        assert nats.proc is not None
        nats.proc.send_signal(signal.SIGHUP)
        await asyncio.wait_for(session.connected.wait(), 60)
        async with aiomqtt.Client(**cluster.client_kwargs(
                cluster.addresses[0], random_client_id("pub"))) as pub:
            await pub.publish(DESIRED, b"gen-1", qos=1, retain=True)
        assert await asyncio.wait_for(got.get(), 30) == b"gen-1"
    finally:
        logging.getLogger("client.receive.session").removeHandler(refused)
        await session.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_controller_stops_with_one_line_when_a_subscription_stays_refused(
        nats: NatsNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "SUBSCRIBE_ATTEMPTS", 2)
    cluster = cluster_of(nats)
    async with aiomqtt.Client(**cluster.client_kwargs(
            cluster.addresses[0], random_client_id("ctl"))) as client:
        await connection.subscribe(client, "fleet/v1/host/+/events")  # granted: returns
        with pytest.raises(BrokerUnavailable) as err:
            await connection.subscribe(client, DENIED)
    assert DENIED in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("topics", "granted", "refused"), [
    (["a"], [1], []),
    (["a"], [0], []),                 # granted at QoS 0 is still granted
    (["a"], [0x80], ["a"]),           # 3.1.1 failure
    (["a", "b"], [1, 0x87], ["b"]),   # MQTT 5: not authorized
    (["a", "b"], [1], ["a", "b"]),    # an answer that does not cover every topic
])
def test_refused_subscriptions(topics: list[str], granted: list[int],
                               refused: list[str]) -> None:
    assert refused_subscriptions(topics, granted) == refused


def test_refused_subscriptions_reads_paho_reason_codes() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
    ok = ReasonCode(PacketTypes.SUBACK, identifier=1)
    denied = ReasonCode(PacketTypes.SUBACK, identifier=0x87)
    assert refused_subscriptions(["a", "b"], [ok, denied]) == ["b"]


def test_a_node_that_never_serves_mqtt_is_not_left_running(tmp_path: Path) -> None:
    """`NatsNode.start` gave up with BrokerStartError and left the nats-server running
    (a test fixture then leaked it for the rest of the run). This node requires a
    password, so an anonymous CONNECT, the readiness probe, never gets CONNACK 0."""
    from controller.mqtt.broker import BrokerStartError
    if nats_binary() is None:
        pytest.fail(f"nats-server is not installed: install it with '{NATS_INSTALL}'")
    node = NatsNode(tmp_path, NatsNodeConfig(
        name="never", store_dir=tmp_path / "js", client_port=free_port(),
        mqtt_port=free_port(), extra=users([DENIED])))
    with pytest.raises(BrokerStartError, match="did not serve MQTT"):
        node.start(timeout=2)
    assert node.proc is not None and node.proc.poll() is not None  # it was stopped
