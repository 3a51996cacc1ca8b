"""Broker addresses: `mqtt://[user[:pass]@]host[:port]`, `mqtts://`, `ws://`, `wss://`.

The password never appears in `str()` or `repr()` of a BrokerAddress, so it cannot
leak into logs, events or `--json` output by accident.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from protocol.errors import UsageError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = "/mqtt"

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def transport(self) -> str:
        return "websockets" if self.scheme in ("ws", "wss") else "tcp"

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"

    def with_credentials(self, username: str | None, password: str | None) -> BrokerAddress:
        return replace(
            self, username=username or self.username, password=password or self.password
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `aiomqtt.Client` (no I/O here: TLS is added by callers)."""
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
        return kwargs


def parse_broker_url(url: str) -> BrokerAddress:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid broker URL: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise UsageError(
            f"invalid broker URL scheme {parts.scheme!r}: use mqtt://, mqtts://, ws:// or wss://"
        )
    if not parts.hostname:
        raise UsageError("invalid broker URL: no host (example: mqtt://127.0.0.1:1883)")
    return BrokerAddress(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=parts.path or "/mqtt",
    )
