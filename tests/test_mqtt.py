"""Issue 13, the pure part: MQTT versions, sessions, refusals, failover, broker lists and
topic prefixes (protocol.mqtt, protocol.broker, protocol.topics), table-tested."""

from __future__ import annotations

from typing import Any

import aiomqtt
import pytest

from protocol.broker import BrokerCluster, parse_broker_urls
from protocol.errors import InputError, UsageError
from protocol.mqtt import (
    SESSION_EXPIRY_S,
    Backoff,
    Failover,
    MqttOptions,
    attempt_failure,
    client_id,
    connack_code,
    failover_order,
    parse_mqtt_version,
    refusal,
    unreachable,
)
from protocol.topics import Topics, prefix_problem

V5, V311 = MqttOptions("5"), MqttOptions("3.1.1")


@pytest.mark.parametrize(("text", "version"), [
    ("5", "5"), ("5.0", "5"), ("3.1.1", "3.1.1"), ("311", "3.1.1"), ("4", "3.1.1"),
    (" 3.1.1 ", "3.1.1"),
])
def test_mqtt_version_parses(text: str, version: str) -> None:
    assert parse_mqtt_version(text) == version


@pytest.mark.parametrize("text", ["", "3.1", "6", "mqtt5", "v4.0"])
def test_bad_mqtt_version_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match=r"use 5 or 3\.1\.1"):
        parse_mqtt_version(text)


# (options, persistent) -> the session part of the aiomqtt.Client arguments
SESSIONS: list[tuple[MqttOptions, bool, dict[str, Any]]] = [
    (V5, True, {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False}),
    (V5, False, {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": True}),
    (V311, True, {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}),
    (V311, False, {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": True}),
]


@pytest.mark.parametrize(("options", "persistent", "expected"), SESSIONS)
def test_connect_kwargs_per_version(options: MqttOptions, persistent: bool,
                                    expected: dict[str, Any]) -> None:
    kwargs = options.connect_kwargs("flotilla-agent-web1", persistent)
    assert kwargs["identifier"] == "flotilla-agent-web1"
    for key, value in expected.items():
        assert kwargs[key] == value
    props = kwargs.get("properties")
    if options.version == "3.1.1":
        # nothing MQTT 5 is sent: no properties, no clean_start
        assert "properties" not in kwargs and "clean_start" not in kwargs
    elif persistent:
        assert props is not None and props.SessionExpiryInterval == SESSION_EXPIRY_S
    else:
        assert props is None  # expiry 0: the session ends with the connection


def test_shared_subscriptions_exist_in_mqtt5_only() -> None:
    assert V5.shared_subscriptions and not V311.shared_subscriptions


@pytest.mark.parametrize(("parts", "ok"), [
    (("flotilla-agent", "web-1"), True), (("fleetctl", "r20261201-201500-abcdef"), True),
    (("a" * 129,), False), (("fleet ctl",), False), (("fleet.ctl",), False), (("",), False),
    (("x/y",), False),
])
def test_client_ids(parts: tuple[str, ...], ok: bool) -> None:
    if ok:
        assert client_id(*parts) == "-".join(parts)
    else:
        with pytest.raises(UsageError):
            client_id(*parts)


# CONNACK code (MQTT 5 numbering; paho maps 3.1.1 codes 1, 4, 5 onto 132, 134, 135),
# version -> None (transient: retry) or a fragment of the fatal one-line message
REFUSALS: list[tuple[int, MqttOptions, str | None]] = [
    (0x84, V5, "--mqtt-version 3.1.1"),
    (0x84, V311, "--mqtt-version 5"),
    (0x86, V5, "--password-file"),
    (0x86, V311, "--password-file"),
    (0x87, V5, "not authorized"),
    (0x8A, V5, "not authorized"),
    (0x85, V311, "client id"),
    (0x88, V5, None),  # server unavailable
    (0x89, V5, None),  # server busy
    (0x97, V5, None),  # quota exceeded
    (0x9F, V5, None),  # connection rate exceeded
    (0x80, V5, None),  # unspecified error
]


@pytest.mark.parametrize(("code", "options", "fragment"), REFUSALS)
def test_refusals(code: int, options: MqttOptions, fragment: str | None) -> None:
    message = refusal(code, options, "mqtt://b1:1883")
    if fragment is None:
        assert message is None
    else:
        assert message is not None and fragment in message and "mqtt://b1:1883" in message
        assert "\n" not in message


def test_connack_code_reads_paho_reason_codes() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
    assert connack_code(ReasonCode(PacketTypes.CONNACK, "Unsupported protocol version")) == 0x84
    assert connack_code(5) == 5 and connack_code(None) is None


@pytest.mark.parametrize(("count", "current", "order"), [
    (3, None, [0, 1, 2]),  # never connected: the listed order
    (3, 0, [1, 2, 0]),     # lost node 0: the next one first, node 0 last
    (3, 2, [0, 1, 2]),
    (1, None, [0]), (1, 0, [0]),
])
def test_failover_order(count: int, current: int | None, order: list[int]) -> None:
    assert failover_order(count, current) == order


def test_failover_backoff_is_capped_jittered_and_reset_on_connect() -> None:
    f = Failover(3, backoff=Backoff(base=0.2, cap=2.0))
    delays = [f.delay() for _ in range(12)]
    assert all(0 < d <= 2.0 for d in delays) and max(delays) > 1.0
    assert len(set(delays)) > 6  # jittered
    f.connected(1)
    assert f.delay() <= 0.2 and f.round() == [2, 0, 1]


def test_broker_lists() -> None:
    one = parse_broker_urls("mqtt://a:1883")
    assert [str(a) for a in one] == ["mqtt://a:1883"]
    three = parse_broker_urls("mqtt://a:1, mqtt://b:2 ,mqtts://c")
    assert [(a.host, a.port) for a in three] == [("a", 1), ("b", 2), ("c", 8883)]
    for bad, fragment in [("", "no broker URL"), ("mqtt://a:1,,mqtt://b:2", "empty entry"),
                          ("mqtt://a:1,mqtt://a:1", "twice"), ("mqtt://a:1,http://b", "scheme")]:
        with pytest.raises(UsageError, match=fragment):
            parse_broker_urls(bad)
    cluster = BrokerCluster.parse("mqtt://u:secret@a:1,mqtt://b:2", "3.1.1")
    assert "secret" not in str(cluster) and "secret" not in repr(cluster)
    assert cluster.with_credentials("ctl", "pw").addresses[1].username == "ctl"
    with pytest.raises(UsageError, match="mix of TLS"):
        BrokerCluster.parse("mqtt://a:1,mqtts://b:2").with_tls()
    with pytest.raises(UsageError, match="connect-timeout"):
        BrokerCluster.parse("mqtt://a:1", connect_timeout=0)


# prefix -> None (accepted) or a fragment of why not
PREFIXES: list[tuple[str, str | None]] = [
    ("fleet/v1", None), ("test-1a/v1", None), ("site_a/fleet/v2", None), ("f", None),
    ("fleet.v1/x", "'.'"), ("my fleet/v1", "white space"), ("fleet/v1\t", "white space"),
    ("fleet/+/v1", "wildcard"), ("fleet/#", "wildcard"), ("$SYS/fleet", "'$'"),
    ("fleet//v1", "empty level"), ("/fleet", "empty level"), ("fleet/", "empty level"),
    ("", "empty"),
    # a level that is exactly `*` or `>` is a NATS wildcard: `fleet/*` would hear every
    # fleet's topics; under `>` nothing arrives (seen: a NATS node delivered
    # nothing on `a/>/x`). Inside a level they are ordinary characters.
    ("fleet/*", "NATS wildcard"), ("fleet/>/v1", "NATS wildcard"), ("fl*et/v>1", None),
]


@pytest.mark.parametrize(("prefix", "fragment"), PREFIXES)
def test_topic_prefixes(prefix: str, fragment: str | None) -> None:
    problem = prefix_problem(prefix)
    if fragment is None:
        assert problem is None
        assert Topics(prefix).desired("h1") == f"{prefix}/host/h1/desired"
    else:
        assert problem is not None and fragment in problem
        with pytest.raises(InputError, match="invalid topic prefix"):
            Topics(prefix)
        with pytest.raises(InputError, match=r"invalid Home Assistant discovery prefix "
                                             r"\(--ha-prefix\)"):
            Topics(ha_prefix=prefix)


@pytest.mark.parametrize("group", ["a.b", "a b", "a/b", "a+", ""])
def test_share_group_names_nats_or_mqtt_would_refuse(group: str) -> None:
    with pytest.raises(InputError, match="share group"):
        Topics().shared(group, "fleet/v1/host/+/events")


def test_hosts_add_prints_the_cluster_and_the_mqtt_version_without_credentials() -> None:
    import argparse

    from controller.commands.security import agent_config
    args = argparse.Namespace(broker="mqtt://ctl:pw@n1:1883,mqtt://n2:1883", agent_broker=None,
                              mqtt_version="3.1.1")
    argv, nixos = agent_config(args, "web1")
    assert argv[argv.index("--broker") + 1] == "mqtt://n1:1883,mqtt://n2:1883"
    assert argv[argv.index("--mqtt-version") + 1] == "3.1.1"
    assert 'broker = "mqtt://n1:1883,mqtt://n2:1883";' in nixos
    assert 'mqttVersion = "3.1.1";' in nixos and "pw" not in nixos + " ".join(argv)
    args.mqtt_version = "5"
    argv, nixos = agent_config(args, "web1")
    assert "--mqtt-version" not in argv and "mqttVersion" not in nixos


@pytest.mark.parametrize(("error", "took", "wait", "shown"), [
    ("Operation timed out", 0.5, 0.5, "took the connection, no CONNACK within 0.5 s"),
    ("Operation timed out", 4.99, 5.0, "took the connection, no CONNACK within 5 s"),
    ("[Errno 111] Connection refused", 0.001, 5.0, "[Errno 111] Connection refused"),
    ("[Errno -2] Name or service not known", 0.02, 10.0,
     "[Errno -2] Name or service not known"),
])
def test_a_failed_attempt_says_why(error: str, took: float, wait: float, shown: str) -> None:
    assert attempt_failure(error, took, wait) == shown


def test_an_unreachable_cluster_names_every_node() -> None:
    assert unreachable({"mqtt://a:1": "refused"}) == \
        "cannot reach the MQTT broker at mqtt://a:1: refused"
    assert unreachable({"mqtt://a:1": "refused", "mqtt://b:2": "no CONNACK"}) == (
        "cannot reach the MQTT broker (no node answered): mqtt://a:1: refused; "
        "mqtt://b:2: no CONNACK")
