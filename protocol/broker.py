"""Broker addresses: `mqtt://[user[:pass]@]host[:port]`, `mqtts://`, `ws://`, `wss://`.

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

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
HOST_RE = re.compile(r"[A-Za-z0-9._:%-]{1,253}")
SESSION_EXPIRY_S = 7 * 24 * 3600


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
        raise UsageError("invalid broker URL: port 0")
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
