"""Broker addresses: `mqtt://[user[:pass]@]host[:port]`, `mqtts://`, `ws://`, `wss://`.

A `BrokerCluster` is what a client is given: one address, or a cluster's nodes as a
comma-separated list (`--broker mqtt://a:1883,mqtt://b:1883`), any of which serves
the whole fleet, plus the MQTT options (`protocol.mqtt`) every client of it uses.

The password never appears in `str()` or `repr()` of a BrokerAddress, nor in the
messages of the errors raised here, so it cannot leak into logs, events or `--json`
output by accident. TLS (`mqtts://`, `wss://`) verifies the broker's certificate
against `--ca-file` (default: the system's CAs) and presents `--cert-file`/`--key-file`
as the client certificate when the broker listener has `require_certificate true`.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from protocol.errors import InputError, UsageError
from protocol.mqtt import DEFAULT_MQTT_VERSION, MqttOptions, MqttVersion
from protocol.numbers import seconds

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
HOST_RE = re.compile(r"[A-Za-z0-9._:%-]{1,253}")
DEFAULT_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = "/mqtt"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Built (and its files read) once by with_tls(), so a reconnect never fails on I/O.
    _ssl: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def transport(self) -> str:
        return "websockets" if self.scheme in ("ws", "wss") else "tcp"

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"

    def with_credentials(self, username: str | None, password: str | None) -> BrokerAddress:
        return replace(
            self, username=username or self.username, password=password or self.password
        )

    def with_tls(self, ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None) -> BrokerAddress:
        """This address with TLS files; checks and loads them now (InputError if bad)."""
        if not self.tls:
            if ca_file or cert_file or key_file:
                raise UsageError("--ca-file/--cert-file/--key-file need a TLS broker URL "
                                 "(mqtts:// or wss://)")
            return self
        context = tls_context(ca_file, cert_file, key_file)
        return replace(self, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                       _ssl=context)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// and wss://, None for plain mqtt:// and ws://."""
        if not self.tls:
            return None
        if self._ssl is not None:
            return self._ssl
        return tls_context(self.ca_file, self.cert_file, self.key_file)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `aiomqtt.Client`, TLS context included."""
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "transport": self.transport,
            # Nagle + delayed ACK costs ~88 ms a round trip; the broker sets nodelay too.
            "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        }
        if self.username is not None:
            kwargs["username"] = self.username
            kwargs["password"] = self.password
        if self.transport == "websockets":
            kwargs["websocket_path"] = self.path
        context = self.ssl_context()
        if context is not None:
            kwargs["tls_context"] = context
        return kwargs


def tls_context(ca_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None) -> ssl.SSLContext:
    """Client TLS context: verify the broker against `ca_file` (default: the system's CAs,
    hostname checked), present `cert_file` + `key_file` as client certificate.

    Every failure is an InputError naming the file, never a traceback.
    """
    if key_file is not None and cert_file is None:
        raise UsageError("--key-file needs --cert-file")
    if cert_file is not None and key_file is None:
        raise UsageError("--cert-file needs --key-file (the client certificate's private key)")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except FileNotFoundError:
            raise InputError(f"CA file {ca_file} not found") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise InputError(f"cannot load CA file {ca_file}: {_ssl_reason(exc)}") from None
    if cert_file is not None and key_file is not None:
        for path in (cert_file, key_file):
            if not path.is_file():
                raise InputError(f"TLS file {path} not found")
        def encrypted() -> bytes:  # else OpenSSL would prompt on the terminal and hang
            raise InputError(f"private key {key_file} is encrypted: give an unencrypted key "
                             "(mode 0600)")

        try:
            context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file),
                                    password=encrypted)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise InputError(f"cannot load client certificate {cert_file} with key {key_file}: "
                             f"{_ssl_reason(exc)}") from None
    return context


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def read_password_file(path: Path) -> str:
    """The password in `path` (surrounding whitespace stripped); never echoes it."""
    try:
        password = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not a text file"
        raise InputError(f"cannot read password file {path}: {reason}") from None
    if not password:
        raise InputError(f"password file {path} is empty")
    if "\n" in password:
        raise InputError(f"password file {path} has more than one line")
    return password


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL; errors never quote the URL (it may hold a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UsageError("invalid broker URL (example: mqtts://broker.example:8883)") from None
    try:
        port = parts.port
    except ValueError:
        if re.fullmatch(r".*:\d+", parts.netloc.rpartition("@")[2]):
            raise UsageError("invalid broker URL: port out of range (1-65535)") from None
        raise UsageError(
            "invalid broker URL: bad port (a password holding '/', '?' or '#' must be "
            "percent-encoded; better use --password-file)") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise UsageError(
            f"invalid broker URL scheme {parts.scheme!r}: use mqtt://, mqtts://, ws:// or wss://"
        )
    if not parts.hostname:
        raise UsageError("invalid broker URL: no host (example: mqtt://127.0.0.1:1883)")
    if not HOST_RE.fullmatch(parts.hostname):
        raise UsageError("invalid broker URL: bad host name")
    if port == 0:
        raise UsageError("invalid broker URL: port out of range (1-65535)")
    tcp = parts.scheme in ("mqtt", "mqtts")
    if (tcp and parts.path not in ("", "/")) or parts.query or parts.fragment or \
            "@" in parts.path:
        raise UsageError(
            "invalid broker URL: unexpected path, '?' or '#' (mqtt:// and mqtts:// take no "
            "path; percent-encode '/', '?' and '#' in a user name or password)")
    return BrokerAddress(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=parts.path if parts.path and not tcp else "/mqtt",
    )


def shown_urls(text: str) -> str:
    """A broker list as a help text may show it (the FLEET_BROKER default): no password."""
    try:
        return ", ".join(str(a) for a in parse_broker_urls(text))
    except UsageError:
        return "FLEET_BROKER (unreadable)"


def parse_broker_urls(text: str) -> tuple[BrokerAddress, ...]:
    """One URL, or a cluster's nodes as comma-separated URLs (a ',' in a password must be
    percent-encoded as %2C); errors never quote the text (it may hold a password)."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise UsageError("no broker URL given (example: mqtt://127.0.0.1:1883)")
    if not all(parts):
        raise UsageError("invalid broker list: an empty entry between commas")
    addresses = tuple(parse_broker_url(p) for p in parts)
    if len(set(addresses)) != len(addresses):
        raise UsageError("invalid broker list: an address is listed twice")
    return addresses


@dataclass(frozen=True)
class BrokerCluster:
    """Where the broker is (one node, or every node of a cluster, tried in order) and how
    to speak to it. `connect_timeout` bounds a command's first connection."""

    addresses: tuple[BrokerAddress, ...]
    mqtt: MqttOptions = field(default_factory=MqttOptions)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.addresses:
            raise UsageError("no broker address given")

    @classmethod
    def of(cls, broker: BrokerCluster | BrokerAddress) -> BrokerCluster:
        """`broker` as a cluster (a single BrokerAddress: a cluster of one node)."""
        return broker if isinstance(broker, BrokerCluster) else cls((broker,))

    @classmethod
    def parse(cls, text: str, version: MqttVersion = DEFAULT_MQTT_VERSION,
              connect_timeout: float | str = DEFAULT_CONNECT_TIMEOUT_S) -> BrokerCluster:
        """`connect_timeout` may be the raw text of --connect-timeout or its variable."""
        try:
            timeout = seconds(connect_timeout)
        except UsageError as exc:
            raise UsageError(f"--connect-timeout (env FLEET_CONNECT_TIMEOUT): {exc}") from None
        return cls(parse_broker_urls(text), MqttOptions(version), timeout)

    def __str__(self) -> str:
        return ", ".join(str(a) for a in self.addresses)

    def with_credentials(self, username: str | None, password: str | None) -> BrokerCluster:
        return replace(self, addresses=tuple(a.with_credentials(username, password)
                                             for a in self.addresses))

    def with_tls(self, ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None) -> BrokerCluster:
        """TLS files for every node (loaded once, shared)."""
        if not any(a.tls for a in self.addresses) and not (ca_file or cert_file or key_file):
            return self
        if len({a.tls for a in self.addresses}) > 1:
            raise UsageError("invalid broker list: mix of TLS and plain URLs")
        return replace(self, addresses=tuple(a.with_tls(ca_file, cert_file, key_file)
                                             for a in self.addresses))

    def client_kwargs(self, address: BrokerAddress, ident: str,
                      persistent: bool = False) -> dict[str, Any]:
        """Everything `aiomqtt.Client` needs to reach `address` as client `ident`."""
        return {**address.client_kwargs(), **self.mqtt.connect_kwargs(ident, persistent)}
