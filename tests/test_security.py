"""Issue 7, security: the shipped ACL, passwords and TLS on a real Mosquitto.

The broker config is derived from the repository's mosquitto.conf by uncommenting its
documented "real fleet" lines (TLS listener with require_certificate, websockets,
allow_anonymous false, password_file, acl_file), so the comments a user follows are
exactly what is tested. Users: hosts a1 and a2 (created with `fleetctl hosts add`),
flotilla-controller and homeassistant. An ACL denial is invisible to a publisher
(Mosquitto acknowledges and drops), so every "cannot" below is asserted as
non-delivery to a subscriber that would see the message, after a later marker
message on the same path has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from controller.cli import main as fleetctl_main
from controller.commands.security import set_broker_password
from controller.mqtt import certs
from controller.mqtt.broker import Mosquitto, free_port
from controller.mqtt.certs import CAKey
from protocol.broker import BrokerAddress, BrokerCluster, parse_broker_url
from protocol.codec import decode, encode
from protocol.models import EVENT_TYPES, Ack, Desired, Event, Rejected, Result
from protocol.mqtt import random_client_id
from protocol.signing import generate_key, sign
from protocol.topics import Topics

REPO = Path(__file__).resolve().parents[1]
ACL = REPO / "mosquitto.acl"
CONTROLLER = "flotilla-controller"
SYSTEM = "/nix/store/aaaa-nixos-system-secure-25.11"
T = Topics()  # the ACL is written for the default prefix


# -- broker set-up ----------------------------------------------------------------------
def derive_secure_conf(text: str, *, passwd: Path, pki: Path, tls_port: int,
                       ws_port: int) -> str:
    """mosquitto.conf with its commented real-fleet lines enabled (and test paths)."""
    replace = {
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "cafile": f"cafile {pki / 'ca.crt'}",
        "certfile": f"certfile {pki / 'broker.crt'}",
        "keyfile": f"keyfile {pki / 'broker.key'}",
        "listener 8080": f"listener {ws_port} 127.0.0.1",
        "password_file": f"password_file {passwd}",
        "acl_file": f"acl_file {ACL}",
    }
    expected = {"listener 8883", "protocol mqtt", "cafile", "certfile", "keyfile",
                "tls_version tlsv1.2", "require_certificate true",
                "use_identity_as_username false", "listener 8080", "protocol websockets",
                "socket_domain ipv4", "allow_anonymous false", "password_file", "acl_file"}
    out, seen = [], set()
    for line in text.splitlines():
        if line.strip() == "allow_anonymous true":
            continue  # the quickstart setting the comments say to swap
        m = re.fullmatch(r"#([a-z_]+(?: \S+)?)(.*)", line)
        if m is None:
            out.append(line)
            continue
        head = m.group(1)
        key = next((k for k in replace if head == k or head.split()[0] == k), None)
        seen.add(key or head)
        out.append(replace[key] if key else line[1:])
    missing = expected - seen
    assert not missing, f"mosquitto.conf lost its documented lines: {sorted(missing)}"
    return "\n".join(out) + "\n"


@dataclass
class Secure:
    root: Path
    pki: Path
    passwd: Path
    passwords: dict[str, Path]
    broker: Mosquitto | None = None
    tls_port: int = field(default_factory=free_port)
    ws_port: int = field(default_factory=free_port)
    wss_port: int = field(default_factory=free_port)

    def password(self, user: str) -> str:
        return self.passwords[user].read_text().strip()

    def secrets(self) -> list[str]:
        return [self.password(u) for u in self.passwords]

    def url(self, scheme: str = "mqtt") -> str:
        assert self.broker is not None
        port = {"mqtt": self.broker.port, "mqtts": self.tls_port, "ws": self.ws_port,
                "wss": self.wss_port}[scheme]
        return f"{scheme}://127.0.0.1:{port}"

    def address(self, user: str | None, scheme: str = "mqtt", cert: str | None = None,
                password: str | None = None) -> BrokerAddress:
        a = parse_broker_url(self.url(scheme))
        if user is not None:
            a = a.with_credentials(user, password or self.password(user))
        if a.tls:
            cert = cert or user
            a = a.with_tls(self.pki / "ca.crt",
                           self.pki / f"{cert}.crt" if cert else None,
                           self.pki / f"{cert}.key" if cert else None)
        return a

    def tls_args(self, user: str) -> list[str]:
        return ["--ca-file", str(self.pki / "ca.crt"), "--cert-file",
                str(self.pki / f"{user}.crt"), "--key-file", str(self.pki / f"{user}.key")]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Secure:
    """PKI and passwords for a1, a2, the controller and Home Assistant (made once)."""
    root = tmp_path_factory.mktemp("secure")
    state = root / "controller-state"
    inv = root / "fleet.toml"
    passwd = root / "mosquitto.passwd"
    passwords = {}
    for host in ("a1", "a2"):
        out = root / f"{host}.password"
        rc = fleetctl_main(["hosts", "add", host, "--tags", "t", "--inventory", str(inv),
                            "--passwd-file", str(passwd), "--password-file-out", str(out),
                            "--state-dir", str(state), "--json"])
        assert rc == 0
        passwords[host] = out
    # "+" and "#": users an operator might create by mistake; with `%u` patterns they would
    # match every host, so Mosquitto 2 denies such clients everything
    for user in (CONTROLLER, "homeassistant", "+", "#"):
        out = root / f"{user}.password"
        out.write_text(f"{user}-{os.urandom(12).hex()}\n")
        set_broker_password(passwd, user, out.read_text().strip())
        passwords[user] = out
    certs.init_ca(state)
    certs.issue(state, "broker", server=True)
    for name in ("a1", "a2", CONTROLLER):
        certs.issue(state, name)
    return Secure(root, certs.pki_dir(state), passwd, passwords)


@pytest.fixture
def secure(credentials: Secure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[Secure]:
    """A fresh Mosquitto running the derived secure config (own ports and data)."""
    s = Secure(credentials.root, credentials.pki, credentials.passwd, credentials.passwords)
    conf = tmp_path / "secure-mosquitto.conf"
    conf.write_text(derive_secure_conf((REPO / "mosquitto.conf").read_text(),
                                       passwd=s.passwd, pki=s.pki, tls_port=s.tls_port,
                                       ws_port=s.ws_port))
    monkeypatch.setenv("FLEET_MOSQUITTO_CONF", str(conf))
    # wss: a websockets listener with the same three TLS lines as the mqtts one
    # (render_config keeps a root-started Mosquitto as root, so it can read pytest's
    # 0700 tmp dirs: password file, certificates, persistence.)
    wss = (f"listener {s.wss_port} 127.0.0.1\nprotocol websockets\n"
           f"cafile {s.pki / 'ca.crt'}\n"
           f"certfile {s.pki / 'broker.crt'}\nkeyfile {s.pki / 'broker.key'}\n"
           "require_certificate true\n")
    s.broker = Mosquitto(tmp_path / "broker", extra=wss)
    s.broker.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the extra listeners open after the first one
        if all(_listening(p) for p in (s.tls_port, s.ws_port, s.wss_port)):
            break
        time.sleep(0.05)
    try:
        yield s
    finally:
        s.broker.stop()


def _listening(port: int) -> bool:
    import socket
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@pytest.fixture
def broker(secure: Secure) -> Mosquitto:
    """make_fleet's broker is the secured one (loopback listener, passwords, ACL)."""
    assert secure.broker is not None
    return secure.broker


@pytest.fixture
def prefix() -> str:
    return "fleet/v1"  # the shipped ACL names the default prefix


# -- MQTT helpers -----------------------------------------------------------------------
def mqtt_client(address: BrokerAddress, timeout: float = 5) -> aiomqtt.Client:
    broker = BrokerCluster((address,))
    return aiomqtt.Client(**broker.client_kwargs(address, random_client_id("test")),
                          timeout=timeout)


async def publish(address: BrokerAddress, topic: str, payload: bytes, retain: bool = False
                  ) -> None:
    async with mqtt_client(address) as c:
        await c.publish(topic, payload, qos=1, retain=retain)


class Collector:
    """Subscribes with some credentials and records every (topic, payload) delivered."""

    def __init__(self, address: BrokerAddress, filters: list[str]) -> None:
        self.address = address
        self.filters = filters
        self.got: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait([self._task, ready], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task.done():
            self._task.result()  # raises why it could not connect
        assert self._ready.is_set(), "subscriber not ready in 10s"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with mqtt_client(self.address) as c:
            for f in self.filters:
                await c.subscribe(f, qos=1)
            self._ready.set()
            async for m in c.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                self.got.append((str(m.topic), payload))

    async def wait(self, topic: str, payload: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (topic, payload) not in self.got:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} {payload!r} not delivered; got {self.got}")
            await asyncio.sleep(0.02)

    def events(self) -> list[Event]:
        out = []
        for _topic, payload in self.got:
            with contextlib.suppress(Exception):
                out.append(decode(payload, expect=EVENT_TYPES))
        return out

    async def wait_event(self, pred: Callable[[Event], bool], timeout: float = 20) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if pred(ev):
                    return ev
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching event in {timeout}s; saw {self.events()[-5:]}")


@contextlib.asynccontextmanager
async def collectors(*specs: tuple[BrokerAddress, list[str]]) -> AsyncIterator[list[Collector]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Collector(a, f)) for a, f in specs]


async def refused(address: BrokerAddress) -> str:
    """Connect and expect a refusal; the error text. With TLS 1.3 the client learns that
    the broker rejected its certificate only after the handshake, so paho then waits for
    a CONNACK that never comes: a short timeout keeps that case quick."""
    try:
        async with mqtt_client(address, timeout=1.5):
            pass
    except aiomqtt.MqttError as exc:
        return str(exc)
    raise AssertionError(f"{address} was allowed to connect")


# -- the ACL ------------------------------------------------------------------------------
async def test_acl_confines_a_host_to_its_own_topics(secure: Secure) -> None:
    ctl, a1, a2, ha = (secure.address(u) for u in (CONTROLLER, "a1", "a2", "homeassistant"))
    controller_reads = [T.all_hosts(k) for k in ("events", "state", "prompt", "online",
                                                 "confirm")]
    async with collectors((a1, ["#"]), (a2, [T.desired("a2"), T.answer("a2")]),
                          (ctl, controller_reads), (ha, ["homeassistant/#"])) as cs:
        a1_all, a2_own, ctl_sees, ha_sees = cs
        # 1. What the controller sends to a2 never reaches a1 (a1 subscribed to '#').
        await publish(ctl, T.desired("a2"), b"D2", retain=True)
        await publish(ctl, T.answer("a2"), b"A2")
        await publish(ctl, T.desired("a1"), b"D1", retain=True)
        await publish(ctl, T.answer("a1"), b"A1")
        await a2_own.wait(T.answer("a2"), b"A2")  # it was published ...
        await a1_all.wait(T.answer("a1"), b"A1")  # ... and a1's later message arrived
        assert a1_all.got == [(T.desired("a1"), b"D1"), (T.answer("a1"), b"A1")]
        # a late subscriber gets only its own retained desired state, not a2's
        async with collectors((a1, ["fleet/#", T.desired("a2")])) as (late,):
            await late.wait(T.desired("a1"), b"D1")
            await publish(ctl, T.answer("a1"), b"A1-late")
            await late.wait(T.answer("a1"), b"A1-late")
            assert all("/a2/" not in topic for topic, _ in late.got), late.got

        # 2. a1 cannot write a2's topics (nor its own desired/answer) ...
        forged = [T.events("a2"), T.state("a2"), T.prompt("a2"), T.online("a2"),
                  T.confirm("a2"), T.desired("a2"), T.answer("a2"), T.desired("a1"),
                  T.answer("a1"), "homeassistant/sensor/flotilla_a2/gen/config",
                  "fleet/v1/controller/sync/x", "homeassistant/status"]
        own = [T.events("a1"), T.state("a1"), T.prompt("a1"), T.online("a1"),
               T.confirm("a1"), "homeassistant/sensor/flotilla_a1/gen/config"]
        async with mqtt_client(a1) as c:
            for topic in forged:
                await c.publish(topic, b"FORGED", qos=1)
            # ... but can write its own (these also mark the end of the forgeries)
            for topic in own:
                await c.publish(topic, b"OWN", qos=1)
        for topic in own[:5]:
            await ctl_sees.wait(topic, b"OWN")
        await ha_sees.wait(own[5], b"OWN")
        await a1_all.wait(T.confirm("a1"), b"OWN")  # a1 reads back its confirm probe
        await publish(ctl, T.answer("a2"), b"A2-after")
        await publish(ctl, T.answer("a1"), b"A1-after")
        await a2_own.wait(T.answer("a2"), b"A2-after")
        await a1_all.wait(T.answer("a1"), b"A1-after")
        for collector in cs:
            assert all(p != b"FORGED" for _, p in collector.got), collector.got
        # the controller reads its own topics and nothing a host reports is hidden from it
        assert {t for t, p in ctl_sees.got if p == b"OWN"} == set(own[:5])
    # a2's retained desired state is still the controller's
    async with collectors((a2, [T.desired("a2")])) as (fresh,):
        await fresh.wait(T.desired("a2"), b"D2")


async def test_wildcard_usernames_and_unknown_users_get_nothing(secure: Secure) -> None:
    ctl, a1 = secure.address(CONTROLLER), secure.address("a1")
    for address in (secure.address("a1", password="not-the-password"),
                    secure.address("nobody", password="x"), secure.address(None)):
        assert "Not authorized" in await refused(address)
    # "#": mosquitto_passwd writes the entry, but Mosquitto reads "#:..." as a comment
    assert "Not authorized" in await refused(secure.address("#"))
    # "+" authenticates, but Mosquitto 2 denies it everything while `%u` patterns are in
    # use (else `fleet/v1/host/%u/desired` would let it read every host's desired state)
    plus = secure.address("+")
    async with collectors((plus, ["#"]), (a1, [T.desired("a1")]),
                          (ctl, [T.all_hosts("events")])) as (plus_sees, a1_own, ctl_sees):
        await publish(ctl, T.desired("a2"), b"D2", retain=True)
        await publish(plus, T.events("a2"), b"FORGED")
        await publish(plus, T.desired("a1"), b"FORGED", retain=True)
        async with mqtt_client(secure.address("a2")) as c:
            await c.publish(T.events("a2"), b"MARK", qos=1)
        await publish(ctl, T.desired("a1"), b"D1", retain=True)
        await ctl_sees.wait(T.events("a2"), b"MARK")
        await a1_own.wait(T.desired("a1"), b"D1")
        assert plus_sees.got == []
        assert ctl_sees.got == [(T.events("a2"), b"MARK")]
        assert a1_own.got == [(T.desired("a1"), b"D1")]
    # the controller cannot impersonate a host: it cannot write a host's events
    async with collectors((ctl, [T.events("a1")])) as (seen,):
        await publish(ctl, T.events("a1"), b"FORGED")
        async with mqtt_client(a1) as c:
            await c.publish(T.events("a1"), b"MARK", qos=1)
        await seen.wait(T.events("a1"), b"MARK")
        assert seen.got == [(T.events("a1"), b"MARK")]


# -- TLS -----------------------------------------------------------------------------------
async def test_tls_listener_refuses_anonymous_and_certless_clients(secure: Secure,
                                                                   tmp_path: Path) -> None:
    ca = secure.pki / "ca.crt"
    url = secure.url("mqtts")
    # anonymous, even with a valid client certificate: CONNACK refuses
    anon = parse_broker_url(url).with_tls(ca, secure.pki / "a1.crt", secure.pki / "a1.key")
    assert "Not authorized" in await refused(anon)
    # a password but no client certificate: the TLS handshake fails
    no_cert = parse_broker_url(url).with_credentials("a1", secure.password("a1")).with_tls(ca)
    assert await refused(no_cert)
    # a certificate from another CA
    rogue = tmp_path / "rogue"
    certs.init_ca(rogue)
    certs.issue(rogue, "a1")
    rogue_pki = certs.pki_dir(rogue)
    forged = parse_broker_url(url).with_credentials("a1", secure.password("a1")).with_tls(
        ca, rogue_pki / "a1.crt", rogue_pki / "a1.key")
    assert await refused(forged)
    # a client that does not trust our CA refuses the broker (system CAs by default)
    untrusting = parse_broker_url(url).with_credentials("a1", secure.password("a1")).with_tls(
        None, secure.pki / "a1.crt", secure.pki / "a1.key")
    assert "CERTIFICATE_VERIFY_FAILED" in await refused(untrusting)
    # valid certificate, wrong password
    assert "Not authorized" in await refused(secure.address("a1", "mqtts", password="wrong"))
    # plain MQTT on the TLS port
    assert await refused(parse_broker_url(f"mqtt://127.0.0.1:{secure.tls_port}")
                         .with_credentials("a1", secure.password("a1")))
    # anonymous on the loopback listener too (allow_anonymous false is global)
    assert "Not authorized" in await refused(parse_broker_url(secure.url("mqtt")))
    # certificate + password: connected, and the ACL applies over TLS too
    async with collectors((secure.address("a1", "mqtts"), ["#"])) as (c,):
        await publish(secure.address(CONTROLLER, "mqtts"), T.answer("a2"), b"A2")
        await publish(secure.address(CONTROLLER, "mqtts"), T.answer("a1"), b"A1")
        await c.wait(T.answer("a1"), b"A1")
        assert c.got == [(T.answer("a1"), b"A1")]


async def test_ws_and_wss_transports_with_credentials(secure: Secure) -> None:
    wss_a1 = secure.address("a1", "wss")
    assert wss_a1.transport == "websockets" and isinstance(wss_a1.ssl_context(), ssl.SSLContext)
    async with collectors((wss_a1, ["#"])) as (c,):
        await publish(secure.address(CONTROLLER, "ws"), T.desired("a2"), b"D2", retain=True)
        await publish(secure.address(CONTROLLER, "ws"), T.desired("a1"), b"D1", retain=True)
        await c.wait(T.desired("a1"), b"D1")
        assert c.got == [(T.desired("a1"), b"D1")]
    assert "Not authorized" in await refused(parse_broker_url(secure.url("ws")))
    no_cert = parse_broker_url(secure.url("wss")).with_credentials(
        "a1", secure.password("a1")).with_tls(secure.pki / "ca.crt")
    # refused during or right after the TLS handshake; which error text the client sees
    # depends on timing (an alert, or the broker closing the socket)
    error = await refused(no_cert)
    assert any(s in error for s in ("CERTIFICATE_REQUIRED", "EOF occurred", "timed out",
                                    "Connection reset")), error


def test_agent_and_fleetctl_over_mqtts_with_client_certificates(make_fleet, secure: Secure  # type: ignore[no-untyped-def]
                                                                ) -> None:
    fleet = make_fleet({"a1": ["t"]})
    fleet.broker_url = secure.url("mqtts")
    fleet.start_agent("a1", "--username", "a1", "--password-file", str(secure.passwords["a1"]),
                      *secure.tls_args("a1"))
    ctl = ["--password-file", str(secure.passwords[CONTROLLER]), *secure.tls_args(CONTROLLER)]
    rc, out = fleet.fleetctl_json("deploy", "a1", "--system", SYSTEM, "--timeout", "30", *ctl)
    assert rc == 0 and out["hosts"] == {"a1": "succeeded"}, out
    rc, rows = fleet.fleetctl_json("status", *ctl)
    assert rc == 0 and rows[0]["online"] is True and rows[0]["system"] == SYSTEM
    # wss:// for fleetctl too
    fleet.broker_url = secure.url("wss")
    rc, rows = fleet.fleetctl_json("status", *ctl)
    assert rc == 0 and rows[0]["generation"] == 1
    # without the client certificate the broker refuses: exit 3, one line, no traceback
    r = fleet.fleetctl("status", "--password-file", str(secure.passwords[CONTROLLER]),
                       "--ca-file", str(secure.pki / "ca.crt"))
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- end to end over the ACL'd broker -------------------------------------------------------
def _texts_of(*roots: Path) -> Iterator[tuple[Path, str]]:
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                yield path, path.read_bytes().decode("utf-8", "replace")


async def test_deploy_with_per_host_credentials_and_no_secret_leaks(make_fleet,  # type: ignore[no-untyped-def]
                                                                    secure: Secure) -> None:
    fleet = make_fleet({"a1": ["t"], "a2": ["t"]})
    for host in ("a1", "a2"):
        fleet.start_agent(host, "--username", host, "--password-file",
                          str(secure.passwords[host]), "-v")
    ctl_pw = ["--password-file", str(secure.passwords[CONTROLLER])]
    outputs: list[str] = []
    async with collectors((secure.address(CONTROLLER), [T.all_hosts("events"),
                                                        T.all_hosts("state")])) as (seen,):
        r = fleet.fleetctl("deploy", "@t", "--system", SYSTEM, "--timeout", "30", "--json",
                           *ctl_pw)
        outputs += [r.stdout, r.stderr]
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["hosts"] == {"a1": "succeeded", "a2": "succeeded"}
        await seen.wait_event(lambda e: isinstance(e, Result) and e.host == "a2")
        # text output, and the password in the URL instead of a file
        r = fleet.fleetctl("deploy", "@t", "--system", SYSTEM + "-2", *ctl_pw)
        outputs += [r.stdout, r.stderr]
        assert r.returncode == 0 and "succeeded" in r.stdout, r.stderr
        url = f"mqtt://{CONTROLLER}:{secure.password(CONTROLLER)}@127.0.0.1:{secure.broker.port}"  # type: ignore[union-attr]
        for args in (["status", "--json"], ["status"], ["status", "-v"]):
            r = fleet.fleetctl(*args, "--broker", url)
            outputs += [r.stdout, r.stderr]
            assert r.returncode == 0 and "a1" in r.stdout, r.stderr
        rows = json.loads(outputs[-6].strip().splitlines()[-1])
        assert [(r["host"], r["online"], r["generation"], r["result"]) for r in rows] == [
            ("a1", True, 2, "succeeded"), ("a2", True, 2, "succeeded")]
        # a wrong password: exit 3, one line, and the wrong password is not echoed
        bad = fleet.root / "bad.password"
        bad.write_text("WrongPassword-4711\n")
        r = fleet.fleetctl("status", "--password-file", str(bad))
        assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "WrongPassword-4711" not in r.stderr + r.stdout
        r = fleet.fleetctl("status", "--broker", url.replace(secure.password(CONTROLLER),
                                                            "WrongPassword-4711"), "--json")
        assert r.returncode == 3 and "WrongPassword-4711" not in r.stderr + r.stdout
        # the collector runs on this loop, which the blocking fleetctl calls held up
        await seen.wait_event(
            lambda e: sum(isinstance(x, Result) for x in seen.events()) >= 4)
    payloads = [p.decode("utf-8", "replace") for _, p in seen.got]
    assert len(seen.events()) >= 8  # acks and results of two deploys, two hosts
    files = list(_texts_of(fleet.root / "agents", fleet.controller_dir))
    assert any(p.name.endswith(".log") for p, _ in files)
    for secret in secure.secrets():
        for path, text in files:
            assert secret not in text, f"password leaked into {path}"
        for text in outputs + payloads:
            assert secret not in text, "password leaked into fleetctl output or an event"


async def test_forged_and_replayed_desired_rejected_over_acl_broker(make_fleet, secure: Secure,  # type: ignore[no-untyped-def]
                                                                   signing_key) -> None:
    fleet = make_fleet({"a1": ["t"], "a2": ["t"]})
    for host in ("a1", "a2"):
        fleet.start_agent(host, "--username", host, "--password-file",
                          str(secure.passwords[host]))
    ctl_pw = ["--password-file", str(secure.passwords[CONTROLLER])]
    rc, out = fleet.fleetctl_json("deploy", "a1", "--system", SYSTEM, *ctl_pw)
    assert rc == 0, out
    ctl, a1 = secure.address(CONTROLLER), secure.address("a1")
    # capture a1's signed desired state of generation 1, as a host could
    async with collectors((a1, [T.desired("a1")])) as (cap,):
        await wait_for_async(lambda: cap.got)
        captured = cap.got[0][1]
    rc, out = fleet.fleetctl_json("deploy", "a1", "--system", SYSTEM + "-2", *ctl_pw)
    assert rc == 0, out  # a1 is at generation 2 now
    now = time.time()
    base = Desired(host="a1", deployment_id="evil-1", generation=9, system=SYSTEM + "-evil",
                   issued_at=now)
    cases = [
        ("forged", sign(base, generate_key()), "bad_signature"),
        ("unsigned", base, "bad_signature"),
        ("other host's, replayed here",
         sign(base.model_copy(update={"host": "a2", "deployment_id": "evil-2"}), signing_key),
         "wrong_host"),
        ("stale", sign(base.model_copy(update={"generation": 1, "deployment_id": "evil-3"}),
                       signing_key), "stale_generation"),
        ("expired", sign(base.model_copy(update={"deployment_id": "evil-4",
                                                 "expires_at": now - 60}), signing_key),
         "expired"),
    ]
    accepts_before = [r for r in fleet.journal("a1") if r["kind"] == "accept"]
    async with collectors((ctl, [T.all_hosts("events")])) as (seen,):
        for _name, desired, reason in cases:
            await publish(ctl, T.desired("a1"), encode(desired), retain=True)
            ev = await seen.wait_event(
                lambda e, d=desired, r=reason: isinstance(e, Rejected) and e.reason == r
                and e.host == "a1" and e.deployment_id in (d.deployment_id, None))
            assert ev.message
        # the exact generation-1 desired state, replayed: its recorded result is re-sent,
        # nothing runs again
        gen1 = decode(captured, expect=(Desired,))
        await publish(ctl, T.desired("a1"), captured, retain=True)
        replay = await seen.wait_event(lambda e: isinstance(e, Result)
                                       and e.deployment_id == gen1.deployment_id)
        assert isinstance(replay, Result) and replay.generation == 1
        # a host's credentials cannot place even a validly signed desired state for a2
        # (the controller's key is not the only guard: a leaked signed message could be)
        smuggled = sign(base.model_copy(update={"host": "a2", "deployment_id": "evil-5",
                                                "generation": 50}), signing_key)
        await publish(a1, T.desired("a2"), encode(smuggled), retain=True)
        marker = sign(base.model_copy(update={"host": "a2", "deployment_id": "mark-a2"}),
                      generate_key())
        await publish(ctl, T.desired("a2"), encode(marker), retain=True)
        await seen.wait_event(lambda e: isinstance(e, Rejected) and e.host == "a2"
                              and e.reason == "bad_signature")
        assert not [e for e in seen.events() if e.deployment_id == "evil-5"]
        assert not [e for e in seen.events() if isinstance(e, Ack)]  # nothing was started
    accepts_after = [r for r in fleet.journal("a1") if r["kind"] == "accept"]
    assert accepts_after == accepts_before and len(accepts_after) == 2
    assert not [r for r in fleet.journal("a2") if r["kind"] == "accept"]
    rc, rows = fleet.fleetctl_json("status", *ctl_pw)
    a1_row = next(r for r in rows if r["host"] == "a1")
    assert a1_row["system"] == SYSTEM + "-2" and a1_row["generation"] == 2


async def wait_for_async(pred: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


# -- fleetctl hosts add / certs -----------------------------------------------------------
def _fleetctl(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_hosts_add_appends_inventory_creates_password_and_prints_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text('# my fleet\n[hosts.web1]\ntags = ["web"]  # keep me\n\n[groups]\n'
                   'front = ["@web"]\n')
    env = {"FLEET_INVENTORY": str(inv), "FLEET_STATE_DIR": str(tmp_path / "state")}
    r = _fleetctl("hosts", "add", "web2", "--tags", "web,eu", "--broker",
                  "mqtts://flotilla-controller:CtlSecret99@broker.example:8883", cwd=tmp_path,
                  env=env)
    assert r.returncode == 0, r.stderr
    text = inv.read_text()
    assert text.startswith('# my fleet\n[hosts.web1]\ntags = ["web"]  # keep me\n')
    assert '[hosts.web2]\ntags = ["web", "eu"]\n' in text
    from controller.state.inventory import parse_inventory
    assert parse_inventory(text).resolve("@eu") == ["web2"]
    passwd = (tmp_path / "mosquitto.passwd").read_text()
    assert passwd.startswith("web2:$7$")
    # the password is printed exactly once, and is the one in the password file
    shown = re.findall(r"^  (\S{32})$", r.stdout, re.M)
    assert len(shown) == 1 and r.stdout.count(shown[0]) == 1
    assert shown[0] not in passwd and "CtlSecret99" not in r.stdout + r.stderr
    assert ("fleet-agent run --host web2 --broker mqtts://broker.example:8883 --username web2 "
            "--password-file") in r.stdout
    assert "--cert-file /etc/flotilla/web2.crt" in r.stdout and "services." in r.stdout
    # JSON needs --password-file-out and never carries the password
    assert fleetctl_main(["hosts", "add", "web3", "--json", "--inventory", str(inv)]) == 2
    assert "--password-file-out" in capsys.readouterr().err
    r = _fleetctl("hosts", "add", "web3", "--json", "--password-file-out", "web3.pw",
                  cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    pw = (tmp_path / "web3.pw").read_text().strip()
    assert (tmp_path / "web3.pw").stat().st_mode & 0o777 == 0o600
    out = json.loads(r.stdout)
    assert out["host"] == "web3" and pw not in r.stdout and "--username" in out["agent_argv"]
    # refusals: one line, exit 2, nothing changed
    before = (inv.read_text(), (tmp_path / "mosquitto.passwd").read_text())
    monkeypatch.chdir(tmp_path)
    for args, fragment in [
        (["web1"], "already in"),
        (["front"], "is a group"),
        (["flotilla-controller"], "broker user"),
        (["Web_1"], "invalid host name"),
        (["web9", "--tags", "a b"], "invalid tag"),
        (["web9", "--password-file-out", "web3.pw"], "exists already"),
    ]:
        assert fleetctl_main(["hosts", "add", *args, "--inventory", str(inv)]) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert (inv.read_text(), (tmp_path / "mosquitto.passwd").read_text()) == before
    # an inventory that cannot be extended is refused before the password file changes
    inline = tmp_path / "inline.toml"
    inline.write_text('hosts = { web1 = { tags = ["web"] } }\n')
    assert fleetctl_main(["hosts", "add", "web9", "--inventory", str(inline)]) == 2
    assert "cannot append" in capsys.readouterr().err
    assert (tmp_path / "mosquitto.passwd").read_text() == before[1]


def test_certs_init_and_host_make_a_verifiable_chain_with_private_keys_0600(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    sd = ["--state-dir", str(state)]
    assert fleetctl_main(["certs", "host", "web1", *sd]) == 2  # no CA yet
    assert "fleetctl certs init" in capsys.readouterr().err
    r = _fleetctl("certs", "init", *sd, cwd=tmp_path)  # the console entry point once
    assert r.returncode == 0 and "ca.key" in r.stdout, r.stderr
    assert fleetctl_main(["certs", "host", "web1", "--json", *sd]) == 0
    assert json.loads(capsys.readouterr().out)["sans"] == ["DNS:web1"]
    assert fleetctl_main(["certs", "host", "broker.example", "--server", "--san", "10.1.2.3",
                          *sd]) == 0
    capsys.readouterr()
    pki = state / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    host = x509.load_pem_x509_certificate((pki / "web1.crt").read_bytes())
    host.verify_directly_issued_by(ca)
    assert host.subject.rfc4514_string() == "CN=web1"
    san = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web1"]
    eku = host.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    server = x509.load_pem_x509_certificate((pki / "broker.example.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    ssan = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ssan.get_values_for_type(x509.DNSName) == ["broker.example", "localhost"]
    assert [str(i) for i in ssan.get_values_for_type(x509.IPAddress)] == ["127.0.0.1",
                                                                          "10.1.2.3"]
    for key in pki.glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
        assert b"PRIVATE KEY" in key.read_bytes()
    assert pki.stat().st_mode & 0o777 == 0o700
    for args, fragment in [(["certs", "init"], "exists already"),
                           (["certs", "host", "web1"], "exists already"),
                           (["certs", "host", "Bad_Name"], "invalid host name"),
                           (["certs", "host", "x", "--server", "--san", "not a name"], "--san"),
                           (["certs", "host", f"{'b' * 40}.{'c' * 40}", "--server"],
                            "CN holds at most 64 characters"),
                           (["certs", "host", "ca"], "reserved")]:
        assert fleetctl_main([*args, *sd]) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, (args, err)


def test_certs_days_a_certificate_cannot_hold_are_refused_and_keep_the_ca(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A validity is added to today's date; one past the year 9999 (the last X.509 and
    Python's datetime can hold) crashed with an OverflowError traceback."""
    from protocol.errors import UsageError
    state = tmp_path / "state"
    sd = ["--state-dir", str(state)]
    assert fleetctl_main(["certs", "init", *sd]) == 0
    pki = state / "pki"
    ca = (pki / "ca.crt").read_bytes()
    capsys.readouterr()
    for args in (["certs", "init", "--force", "--days", "3000000"],
                 ["certs", "host", "web1", "--days", "99999999999"],
                 ["certs", "host", "broker.example", "--server", "--days", "36501"]):
        with pytest.raises(SystemExit) as exc:  # refused while parsing, before anything runs
            fleetctl_main([*args, *sd])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1, (args, lines)
        assert f"--days: must be a whole number from 1 to {certs.MAX_DAYS}" in lines[0], lines
    assert (pki / "ca.crt").read_bytes() == ca and sorted(p.name for p in pki.iterdir()) == [
        "ca.crt", "ca.key"]
    for call in (lambda: certs.init_ca(state, days=3000000, force=True),
                 lambda: certs.issue(state, "web1", days=99999999999)):
        with pytest.raises(UsageError, match=r"^--days must be a whole number from 1 to"):
            call()
    assert (pki / "ca.crt").read_bytes() == ca
    # the longest validity accepted makes certificates that load and chain
    longest = ["--days", str(certs.MAX_DAYS)]
    assert fleetctl_main(["certs", "init", "--force", *longest, *sd]) == 0
    assert fleetctl_main(["certs", "host", "web1", *longest, *sd]) == 0
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    host = x509.load_pem_x509_certificate((pki / "web1.crt").read_bytes())
    host.verify_directly_issued_by(ca_cert)
    assert host.not_valid_after_utc == ca_cert.not_valid_after_utc  # never outlives its CA
    assert ca_cert.not_valid_after_utc.year >= 2100


# -- an operator's own CA, and CA files that cannot be used -------------------------------
def _hand_made_ca(pki: Path, key: CAKey, *, ski: bool = False, ca: bool = True,
                  days: int = 365, cert_key: CAKey | None = None) -> None:
    """ca.key and ca.crt as an operator makes them by hand (`openssl req -x509`, any
    tool): no SubjectKeyIdentifier unless asked; `cert_key` signs a certificate for
    another key (a pair that does not match)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ops Root CA")])
    public = (cert_key or key).public_key()
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(public).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=400))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                                        critical=False)
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (pki / "ca.crt").write_bytes(builder.sign(cert_key or key, hashes.SHA256())
                                 .public_bytes(serialization.Encoding.PEM))


def _tls_handshake(pki: Path, server: str, client: str) -> None:
    """A TLS handshake in memory between `server` and `client`, each trusting only
    ca.crt and checking the other's certificate, as Mosquitto and the agents do."""
    s_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    s_ctx.load_cert_chain(pki / f"{server}.crt", pki / f"{server}.key")
    s_ctx.load_verify_locations(pki / "ca.crt")
    s_ctx.verify_mode = ssl.CERT_REQUIRED
    c_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c_ctx.load_cert_chain(pki / f"{client}.crt", pki / f"{client}.key")
    c_ctx.load_verify_locations(pki / "ca.crt")
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    s = s_ctx.wrap_bio(to_server, out_s := ssl.MemoryBIO(), server_side=True)
    c = c_ctx.wrap_bio(to_client, out_c := ssl.MemoryBIO(), server_hostname=server)
    done: set[str] = set()
    for _ in range(10):
        for name, end in (("client", c), ("server", s)):
            if name not in done:
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                    done.add(name)
        to_server.write(out_c.read())
        to_client.write(out_s.read())
        if done == {"client", "server"}:
            with contextlib.suppress(ssl.SSLWantReadError):
                s.read()  # TLS 1.3: the server checks the client's certificate here
            return
    raise AssertionError(f"handshake did not finish: {done}")


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP384R1()),
                                 rsa.generate_private_key(65537, 2048)],
                         ids=["ecdsa-p384", "rsa-2048"])
def test_certs_host_signs_with_an_operators_own_ca_without_a_key_identifier(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], key: CAKey) -> None:
    """A CA certificate without a SubjectKeyIdentifier (optional for a self-signed
    one, RFC 5280 4.2.1.2) crashed `certs host` with a traceback."""
    state = tmp_path / "state"
    pki = state / "pki"
    _hand_made_ca(pki, key)
    ca_before = (pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes()
    sd = ["--state-dir", str(state)]
    assert fleetctl_main(["certs", "host", "localhost", "--server", *sd]) == 0
    assert fleetctl_main(["certs", "host", "web1", *sd]) == 0, capsys.readouterr().err
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    for name in ("localhost", "web1"):
        x509.load_pem_x509_certificate((pki / f"{name}.crt").read_bytes()
                                       ).verify_directly_issued_by(ca)
    _tls_handshake(pki, "localhost", "web1")  # OpenSSL accepts both sides' chains
    assert ((pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes()) == ca_before


def test_tls_handshake_helper_fails_for_a_certificate_of_another_ca(tmp_path: Path) -> None:
    """The handshake above can fail: a client certificate from another CA is refused."""
    here, other = tmp_path / "here", tmp_path / "other"
    for state in (here, other):
        certs.init_ca(state)
    certs.issue(here, "localhost", server=True)
    certs.issue(other, "web1")
    for suffix in ("crt", "key"):
        (certs.pki_dir(here) / f"web1.{suffix}").write_bytes(
            (certs.pki_dir(other) / f"web1.{suffix}").read_bytes())
    with pytest.raises(ssl.SSLError):
        _tls_handshake(certs.pki_dir(here), "localhost", "web1")


def _other_key_pair(pki: Path) -> None:
    _hand_made_ca(pki, ec.generate_private_key(ec.SECP256R1()), ski=True,
                  cert_key=ec.generate_private_key(ec.SECP256R1()))


def _rsa_key_for_an_ec_ca(pki: Path) -> None:
    _hand_made_ca(pki, rsa.generate_private_key(65537, 2048),
                  cert_key=ec.generate_private_key(ec.SECP256R1()))


def _garbage(name: str, data: bytes) -> Callable[[Path], None]:
    def make(pki: Path) -> None:
        certs.init_ca(pki.parent)
        (pki / name).write_bytes(data)
    return make


def _ed25519_ca(pki: Path) -> None:
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ed CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=9)).sign(key, None))
    pki.mkdir(parents=True)
    (pki / "ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (pki / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _encrypted_key(pki: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _hand_made_ca(pki, key, ski=True)
    (pki / "ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2")))


def _leaf_as_ca(pki: Path) -> None:
    _hand_made_ca(pki, ec.generate_private_key(ec.SECP256R1()), ski=True, ca=False)


def _expired_ca(pki: Path) -> None:
    _hand_made_ca(pki, ec.generate_private_key(ec.SECP256R1()), ski=True, days=-1)


BAD_CA: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("key of another pair", _other_key_pair, ["ca.key does not match", "ca.crt"]),
    ("rsa key, ecdsa cert", _rsa_key_for_an_ec_ca, ["ca.key does not match", "ca.crt"]),
    ("crt not PEM", _garbage("ca.crt", b"hello\n"), ["cannot load", "ca.crt"]),
    ("crt empty", _garbage("ca.crt", b""), ["cannot load", "ca.crt"]),
    ("crt is a key", _garbage("ca.crt", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                              b"-----END PRIVATE KEY-----\n"), ["cannot load", "ca.crt"]),
    ("key not PEM", _garbage("ca.key", b"\x00\xff garbage"), ["cannot load", "ca.key"]),
    ("key broken PEM", _garbage("ca.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                b"-----END PRIVATE KEY-----\n"), ["cannot load", "ca.key"]),
    ("ed25519 key", _ed25519_ca, ["ca.key", "ECDSA or RSA"]),
    ("encrypted key", _encrypted_key, ["cannot load", "ca.key", "encrypted"]),
    ("leaf certificate", _leaf_as_ca, ["ca.crt", "not a CA certificate"]),
    ("expired CA", _expired_ca, ["ca.crt", "expired"]),
]


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in BAD_CA],
                         ids=[c[0] for c in BAD_CA])
def test_certs_host_refuses_ca_files_it_cannot_sign_with_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None],
        fragments: list[str]) -> None:
    """A ca.key that is not ca.crt's issued certificates that verify against nothing,
    silently; garbage, a key type it cannot sign with, a non-CA or expired certificate
    must be one line and exit 2, with nothing written and the CA files kept."""
    state = tmp_path / "state"
    pki = state / "pki"
    make(pki)
    before = {p.name: p.read_bytes() for p in pki.iterdir()}
    capsys.readouterr()
    for args in (["web1"], ["broker.example", "--server"]):
        assert fleetctl_main(["certs", "host", *args, "--state-dir", str(state)]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(f in lines[0] for f in fragments), lines
    assert {p.name: p.read_bytes() for p in pki.iterdir()} == before


SANS: list[tuple[str, str | x509.GeneralName]] = [
    ("10.1.2.3", x509.IPAddress(ipaddress.ip_address("10.1.2.3"))),
    ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
    ("fe80::1", x509.IPAddress(ipaddress.ip_address("fe80::1"))),
    ("Broker.Example", x509.DNSName("broker.example")),
    ("10.broker.example", x509.DNSName("10.broker.example")),
    ("web1.eu1", x509.DNSName("web1.eu1")),
    ("1a", x509.DNSName("1a")),
    # looks like an IPv4 address and is none; a top-level label is never all digits
    ("999.1.1.1", "last label"),
    ("1.2.3.256", "last label"),
    ("10.0.0", "last label"),
    ("010.1.2.3", "last label"),
    ("example.123", "last label"),
    ("8", "last label"),
    # the certificate's IP address has no room for a zone: it would be fe80::1 only
    ("fe80::1%eth0", "zone"),
    ("fe80::1%1", "zone"),
    ("not a name", "--san"),
    ("-x.example", "--san"),
]


@pytest.mark.parametrize(("value", "expected"), SANS, ids=[v for v, _ in SANS])
def test_san_entry(value: str, expected: str | x509.GeneralName) -> None:
    from protocol.errors import UsageError
    if isinstance(expected, str):
        with pytest.raises(UsageError) as exc:
            certs.san_entry(value)
        message = str(exc.value)
        assert expected in message and repr(value) in message and "\n" not in message
    else:
        assert certs.san_entry(value) == expected


def test_certs_host_refuses_an_ip_like_broker_name_or_san_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--san 999.1.1.1` went into the certificate as a DNS name, and `--san
    fe80::1%eth0` was shown with its zone, which the certificate does not hold."""
    state = tmp_path / "state"
    sd = ["--state-dir", str(state)]
    certs.init_ca(state)
    for args, fragment in [(["--san", "999.1.1.1"], "invalid --san '999.1.1.1'"),
                           (["--san", "fe80::1%eth0"], "zone"),
                           (["--san", "10.1.2.3", "--san", "10.1.2"], "invalid --san"),
                           ([], "invalid broker name '999.1.1.1'")]:
        name = "999.1.1.1" if not args else "broker.example"
        assert fleetctl_main(["certs", "host", name, "--server", *args, *sd]) == 2, args
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in certs.pki_dir(state).iterdir()) == ["ca.crt", "ca.key"]


# -- flags and messages -------------------------------------------------------------------
def test_tls_and_credential_flag_errors_are_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main as agent_main
    pw = tmp_path / "pw"
    pw.write_text("S3cretPassw0rd\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    inventory = tmp_path / "fleet.toml"
    inventory.write_text("[hosts.a1]\n")
    key = tmp_path / "trust.pub"
    from protocol.signing import public_key_pem
    key.write_bytes(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    cases = [
        (["--broker", "mqtt://127.0.0.1:1", "--ca-file", str(pw)], "need a TLS broker URL"),
        (["--broker", "mqtts://127.0.0.1:1", "--ca-file", str(tmp_path / "nope")], "not found"),
        (["--broker", "mqtts://127.0.0.1:1", "--ca-file", str(pw)], "cannot load CA file"),
        (["--broker", "mqtts://127.0.0.1:1", "--cert-file", str(pw)], "needs --key-file"),
        (["--broker", "mqtts://127.0.0.1:1", "--cert-file", str(pw), "--key-file", str(pw)],
         "cannot load client certificate"),
        (["--password-file", str(tmp_path / "nope")], "cannot read password file"),
        (["--password-file", str(empty)], "is empty"),
        (["--broker", "mqtt://u:S3cret@127.0.0.1:70000"], "port out of range (1-65535)"),
        (["--broker", "mqtt://u:S3cret@127.0.0.1:0"], "port out of range (1-65535)"),
        (["--broker", "mqtt://u:S3cret/Passw0rd@127.0.0.1:1"], "bad port"),
    ]
    for extra, fragment in cases:
        for main, argv in (
            (fleetctl_main, ["status", "--inventory", str(inventory), *extra]),
            (agent_main, ["run", "--host", "a1", "--state-dir", str(tmp_path / "agent"),
                          "--trust-key", str(key), *extra]),
        ):
            assert main(argv) == 2, argv
            out, err = capsys.readouterr()
            assert fragment in err and len(err.strip().splitlines()) == 1, err
            assert "S3cret" not in err + out
    # the same through the real console entry points
    for argv in ([sys.executable, "-m", "controller", "status", "--inventory", str(inventory),
                  *cases[0][0]],
                 [sys.executable, "-m", "client", "run", "--host", "a1", "--state-dir",
                  str(tmp_path / "agent"), "--trust-key", str(key), *cases[-1][0]]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and "S3cret" not in r.stderr


def test_help_never_shows_a_password_from_the_environment() -> None:
    """`--help` shows each option's default; FLEET_BROKER's may hold a password."""
    env = {**os.environ, "FLEET_BROKER": "mqtt://ctl:S3cret@broker.example:1883"}
    for argv in (["controller", "status", "--help"], ["client", "run", "--help"]):
        r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                           timeout=30, env=env)
        assert r.returncode == 0 and "S3cret" not in r.stdout + r.stderr
        assert "mqtt://ctl@broker.example:1883" in r.stdout


def test_help_recommends_password_file() -> None:
    for argv in (["controller", "status", "--help"], ["client", "run", "--help"]):
        r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                           timeout=30)
        text = " ".join(r.stdout.split())
        assert r.returncode == 0
        assert "process listings" in text and "--password-file" in text
        assert "recommended" in text
