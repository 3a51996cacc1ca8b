"""How every Flotilla MQTT client is built: version, session, client ids, refusals, backoff.

The agent (`client.receive.session`), the controller (`controller.mqtt.connection`), the tests and
the benchmarks all build their `aiomqtt.Client` from `connect_kwargs()`, so MQTT 5 and
MQTT 3.1.1 differ in this one module only. The decisions here are pure; it opens no
connection itself: `publish_until_lost` and `subscribe_until_granted` act on a client
they are given, and `ManualAck` is the one reach into aiomqtt's paho client.

- MQTT 5 (default): a persistent session is `clean_start=False` plus a
  SessionExpiryInterval, so a session nobody ends expires on its own.
- MQTT 3.1.1 (`--mqtt-version 3.1.1`, for brokers that speak only 3.1.1, such as the
  NATS MQTT gateway): a persistent session is `clean_session=False` with a stable
  client id and never expires; the controller ends the sessions it opens explicitly
  (a clean-session connect with the same id). Nothing that needs MQTT 5 is sent: no
  properties, no shared subscriptions (`--share-group` is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
from aiomqtt import ProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.errors import BrokerRefused, FlotillaError, UsageError

MqttVersion = Literal["5", "3.1.1"]
MQTT_VERSIONS: tuple[MqttVersion, ...] = ("5", "3.1.1")
DEFAULT_MQTT_VERSION: MqttVersion = "5"
SESSION_EXPIRY_S = 7 * 24 * 3600
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
VERSION_FIX = "--mqtt-version 3.1.1"


def parse_mqtt_version(text: str) -> MqttVersion:
    """'5' or '3.1.1' (also '3', '311', '4' = the 3.1.1 protocol level); UsageError else."""
    value = text.strip().lower()
    if value in ("5", "5.0", "v5"):
        return "5"
    if value in ("3.1.1", "311", "3", "4", "v3.1.1"):
        return "3.1.1"
    raise UsageError(f"invalid MQTT version {text!r} (--mqtt-version, env FLEET_MQTT_VERSION): "
                     "use 5 or 3.1.1")


def client_id(*parts: str) -> str:
    """A client id from `parts` joined by '-': 1-128 of A-Z a-z 0-9 _ -, so it is valid
    on every broker we run (MQTT 3.1.1 servers MAY refuse others) and stable for the
    same parts (a persistent 3.1.1 session is found by its client id alone)."""
    ident = "-".join(parts)
    if not CLIENT_ID_RE.fullmatch(ident):
        raise UsageError(f"invalid MQTT client id {ident!r}: use 1-128 of A-Z, a-z, 0-9, "
                         "'_' and '-'")
    return ident


def random_client_id(role: str) -> str:
    return client_id(role, f"{random.getrandbits(48):012x}")


@dataclass(frozen=True)
class MqttOptions:
    """The MQTT protocol choices shared by every client of one process."""

    version: MqttVersion = DEFAULT_MQTT_VERSION

    @property
    def shared_subscriptions(self) -> bool:
        """`$share/GROUP/...` exists in MQTT 5 only (and must still be probed)."""
        return self.version == "5"

    def connect_kwargs(self, ident: str, persistent: bool = False) -> dict[str, Any]:
        """`aiomqtt.Client` keyword arguments for this version: protocol, client id and
        session (persistent: resumed on reconnect, queued QoS 1 messages kept)."""
        ident = client_id(ident)
        if self.version == "3.1.1":
            return {"protocol": ProtocolVersion.V311, "identifier": ident,
                    "clean_session": not persistent}
        kwargs: dict[str, Any] = {"protocol": ProtocolVersion.V5, "identifier": ident,
                                  "clean_start": not persistent}
        if persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            kwargs["properties"] = props
        return kwargs


# CONNACK reason codes (MQTT 5 values; paho maps a 3.1.1 return code onto them) that no
# retry can fix: the client stops with the fix in the message instead of retrying.
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_ID_NOT_VALID = 0x85
BAD_CREDENTIALS = 0x86
NOT_AUTHORIZED = 0x87
BANNED = 0x8A
BAD_AUTH_METHOD = 0x8C


def connack_code(rc: object) -> int | None:
    """The numeric CONNACK reason code of what aiomqtt raised at connect (`exc.rc`)."""
    if isinstance(rc, int):
        return rc
    value = getattr(rc, "value", None)
    return value if isinstance(value, int) else None


def refusal(code: int | None, options: MqttOptions, where: str) -> str | None:
    """The one-line message for a CONNACK refusal that retrying cannot fix, or None for a
    transient one (server busy or unavailable, quota, rate: retry with backoff)."""
    if code == UNSUPPORTED_PROTOCOL_VERSION:
        if options.version == "5":
            return (f"the MQTT broker at {where} refused MQTT 5 (unsupported protocol "
                    f"version): it speaks MQTT 3.1.1 only; use {VERSION_FIX} "
                    "(env FLEET_MQTT_VERSION=3.1.1)")
        return (f"the MQTT broker at {where} refused MQTT 3.1.1 (unsupported protocol "
                "version); use --mqtt-version 5")
    if code in (BAD_CREDENTIALS, BAD_AUTH_METHOD):
        return (f"the MQTT broker at {where} refused the credentials (bad user name or "
                "password): check --username and --password-file")
    if code in (NOT_AUTHORIZED, BANNED):
        return (f"the MQTT broker at {where} refused the connection (not authorized): "
                "check --username/--password-file and the broker's users and ACL")
    if code == CLIENT_ID_NOT_VALID:
        return f"the MQTT broker at {where} refused the client id (client identifier not valid)"
    return None


# SUBACK: a granted QoS (0-2) or, from 0x80 on, a failure (3.1.1: 0x80; MQTT 5: a reason
# code such as 0x87 not authorized). A refused subscription delivers nothing, silently.
SUBACK_FAILURE = 0x80


def refused_subscriptions(topics: Sequence[str], granted: Sequence[object]) -> list[str]:
    """The topics of one SUBSCRIBE the broker refused, from its SUBACK codes (aiomqtt's
    `subscribe()` returns them, ints or paho ReasonCodes, and raises on none of them).
    NATS refuses one when it cannot create the subscription's JetStream consumer in
    time (a busy cluster): the client must subscribe again, or it never hears a
    message on that topic."""
    codes = [connack_code(g) for g in granted]
    if len(codes) != len(topics):
        return list(topics)  # a SUBACK that does not answer every topic: trust none
    return [t for t, c in zip(topics, codes, strict=True) if c is None or c >= SUBACK_FAILURE]


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter, between rounds over a cluster's
    addresses (each address is tried once per round)."""

    base: float = 0.2
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def failover_order(count: int, current: int | None) -> list[int]:
    """Indexes of a cluster's addresses in the order to try them: the first one first
    when never connected; after a loss, the next node after ours first, ours last (it
    just went away; a restarted node is tried again after the others)."""
    if current is None:
        return list(range(count))
    start = (current + 1) % count
    return [(start + i) % count for i in range(count)]


@dataclass
class Failover:
    """Which node of a cluster to try next, and how long to wait after a round in which
    none answered. The edges (agent session, controller connection) run the I/O:

        for i in failover.round(): try addresses[i]; on success failover.connected(i)
        then sleep failover.delay() and start another round (or give up at a deadline).
    """

    count: int
    current: int | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def round(self) -> list[int]:
        return failover_order(self.count, self.current)

    def connected(self, index: int) -> None:
        self.current = index
        self.backoff.reset()

    def delay(self) -> float:
        return self.backoff.next_delay()


async def publish_until_lost(client: aiomqtt.Client, lost: asyncio.Future[None], topic: str,
                             payload: bytes, *, qos: int, retain: bool) -> bool:
    """One publish, waited for until the broker acknowledges it (True) or the connection
    `lost` resolves first (False: the caller tries again on the next connection). No
    aiomqtt timeout (a timer and a task per message) and no asyncio.wait() on two futures:
    the keepalive ends a dead connection, whose loss cancels the attempt (one callback).
    The agent's session and the controller's driver publish through this; MqttError and
    the caller's own cancellation pass through."""
    attempt = asyncio.ensure_future(
        client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf))

    def cancel(_: object) -> None:
        attempt.cancel()

    lost.add_done_callback(cancel)
    try:
        await attempt
        return True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not lost.done() or (task is not None and task.cancelling()):
            raise  # we are being stopped, not the connection
        return False
    finally:
        lost.remove_done_callback(cancel)


async def subscribe_until_granted(
        client: aiomqtt.Client, subscriptions: Sequence[tuple[str, int]], backoff: Backoff, *,
        attempts: int | None = None, wanted: Callable[[str, int], bool] | None = None,
        on_refused: Callable[[list[str], float], None] | None = None,
        **subscribe_kwargs: Any) -> list[str]:
    """Subscribe (one SUBSCRIBE), then again, with `backoff`, to what the broker refused,
    until it grants all of it. aiomqtt returns a SUBACK failure instead of raising, and a
    busy NATS cluster sends one when creating the JetStream consumer behind the
    subscription times out: a client that carried on would never hear a message there.
    Returns what is still refused after `attempts` SUBSCRIBEs (None: no limit, for a
    daemon); a topic `wanted` says is no longer wanted is not asked for again (nor
    returned). `on_refused(topics, delay)` is told before each wait (the caller logs)."""
    todo = list(subscriptions)
    attempt = 0
    while todo:
        granted = await client.subscribe(todo, **subscribe_kwargs)
        refused = set(refused_subscriptions([t for t, _ in todo], granted))
        todo = [(t, q) for t, q in todo if t in refused]
        attempt += 1
        if not todo or (attempts is not None and attempt >= attempts):
            break
        delay = backoff.next_delay()
        if on_refused is not None:
            on_refused([t for t, _ in todo], delay)
        await asyncio.sleep(delay)
        if wanted is not None:
            todo = [(t, q) for t, q in todo if wanted(t, q)]
    return [t for t, _ in todo]


def raise_if_refused(exc: aiomqtt.MqttError, options: MqttOptions, where: str) -> None:
    """Raise BrokerRefused if `exc`, raised while connecting to `where`, is a refusal
    no retry can fix (see `refusal`); return for anything a retry may cure."""
    if isinstance(exc, aiomqtt.MqttCodeError):
        message = refusal(connack_code(exc.rc), options, where)
        if message is not None:
            raise BrokerRefused(message) from None


def attempt_failure(error: str, took: float, wait: float) -> str:
    """Why one connection attempt failed, for the operator: aiomqtt says only
    "Operation timed out" for a node that took the connection and never answered."""
    if took >= wait * 0.95:
        return f"took the connection, no CONNACK within {wait:g} s"
    return error


def unreachable(failures: dict[str, str]) -> str:
    """The one line for a broker none of whose nodes answered: each node (in the
    order of `failures`) and why."""
    if len(failures) == 1:
        [(address, why)] = failures.items()
        return f"cannot reach the MQTT broker at {address}: {why}"
    nodes = "; ".join(f"{address}: {why}" for address, why in failures.items())
    return f"cannot reach the MQTT broker (no node answered): {nodes}"


class ManualAck:
    """QoS 1 acknowledgement after the handler returned, not when paho read the packet.

    aiomqtt 2.x has no manual-ack API (empicano/aiomqtt#345): paho acks a QoS 1 PUBLISH
    as soon as its `on_message` returns, before the agent journaled it. This is the one
    place Flotilla reaches into aiomqtt's private paho client (`Client._client`), and it
    checks what it needs so that a changed aiomqtt fails at start with one clear line
    instead of silently acking early (messages lost on a crash)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        paho: Any = getattr(client, "_client", None)
        if not (callable(getattr(paho, "manual_ack_set", None))
                and callable(getattr(paho, "ack", None))):
            raise FlotillaError(
                f"aiomqtt {getattr(aiomqtt, '__version__', '?')} has no paho client with "
                "manual acks; install aiomqtt 2.5 (what Flotilla is tested with)")
        paho.manual_ack_set(True)
        self._paho = paho

    def ack(self, message: aiomqtt.Message) -> None:
        self._paho.ack(message.mid, message.qos)


RECANCEL_S = 0.5


async def cancel_and_wait(task: asyncio.Task[Any],
                          *expected: type[BaseException]) -> None:
    """Cancel `task` and wait until it has ended; its CancelledError and the `expected`
    exceptions are swallowed, others raised. Python 3.11's asyncio.wait_for, which
    aiomqtt's subscribe and unsubscribe wait in, drops a cancellation that arrives just
    as the SUBACK does (CPython gh-86296), and the task would read messages for ever
    (a `fleetctl demo` stopped by SIGTERM hung so): until it ends, it is cancelled again
    every RECANCEL_S."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_S)
    with contextlib.suppress(asyncio.CancelledError, *expected):
        task.result()
