"""Who may use the dashboard, and proof that a form was posted by our own page.

Tokens are random 256-bit secrets shown once by `fleetctl serve --new-token NAME`; the
token file keeps only their SHA-256 (enough for secrets of that strength), so reading it
gives nobody a way in. A browser logs in once with a token and gets a session cookie
(HttpOnly, SameSite=Strict); scripts send `Authorization: Bearer TOKEN`.

Tokens are required on any non-loopback listener, and everywhere once the token file
holds at least one (so a loopback listener behind a reverse proxy is not left open).
Without tokens (loopback only) every request is `local`, and the Host header must name
a loopback address, so a DNS-rebinding page cannot reach the dashboard under its name.

Every state-changing request (POST) needs the CSRF token of its session, which only
our pages carry (an HMAC of the session id with a per-process secret), and an Origin,
if the browser sends one, equal to our own. A bearer request is exempt from the CSRF
token: no browser attaches that header to a cross-site request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import InputError, StateError, UsageError

TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SESSION_COOKIE = "flotilla_session"
SESSION_TTL_S = 12 * 3600
LOCAL = "local"
DEFAULT_LISTEN = "127.0.0.1:8470"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """True for a listen or Host-header address that only this machine can reach."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`) of a listener; UsageError naming `option` else."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise UsageError(f"{option} {value!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise UsageError(f"{option} {value!r}: port must be 0-65535")
    return host, number


@dataclass
class TokenFile:
    """`{"tokens": [{"name", "sha256", "created"}]}`, mode 0600, re-read when it changes
    (tokens added or revoked while the server runs take effect at once)."""

    path: Path
    _mtime: float = -1.0
    _tokens: dict[str, str] = field(default_factory=dict)  # digest -> name

    def _load(self) -> dict[str, str]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._tokens, self._mtime = {}, -1.0
            return self._tokens
        except OSError as exc:
            raise StateError(f"cannot read token file {self.path}: {exc.strerror}") from None
        if mtime != self._mtime:
            self._tokens = {e["sha256"]: e["name"] for e in self._entries()}
            self._mtime = mtime
        return self._tokens

    def _entries(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            entries = data["tokens"]
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("name"), str)
                    and isinstance(e.get("sha256"), str) for e in entries):
                raise ValueError("tokens must be a list of {name, sha256}")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot read token file {self.path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"token file {self.path} is not valid: {exc}") from None
        return list(entries)

    def names(self) -> list[str]:
        return sorted(self._load().values())

    def any(self) -> bool:
        return bool(self._load())

    def check(self, token: str) -> str | None:
        """The name of `token`, or None."""
        digest = token_digest(token)
        for known, name in self._load().items():
            if hmac.compare_digest(known, digest):
                return name
        return None

    def still_valid(self, digest: str) -> bool:
        return digest in self._load()

    def add(self, name: str) -> str:
        """Create a token called `name`; returns the secret (shown once, never stored)."""
        if not TOKEN_NAME_RE.fullmatch(name):
            raise UsageError(f"invalid token name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        entries = [e for e in self._entries() if e["name"] != name]
        token = "flt_" + secrets.token_urlsafe(32)
        entries.append({"name": name, "sha256": token_digest(token), "created": time.time()})
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self._entries()
        kept = [e for e in entries if e["name"] != name]
        if len(kept) != len(entries):
            self._write(kept)
        return len(kept) != len(entries)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"tokens": entries}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateError(f"cannot write token file {self.path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Identity:
    name: str          # token name, or `local`
    session: str       # what the CSRF token is bound to
    bearer: bool = False

    @property
    def actor(self) -> str:
        """Who did it, as recorded in answers and the event log."""
        return f"web:{self.name}"


@dataclass
class Session:
    name: str
    digest: str
    expires: float


class Guard:
    """Decides who a request is; keeps login sessions in memory (a restart logs out)."""

    def __init__(self, tokens: TokenFile, loopback_listener: bool) -> None:
        self.tokens = tokens
        self.loopback_listener = loopback_listener
        self._secret = secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}

    @property
    def tokens_required(self) -> bool:
        return not self.loopback_listener or self.tokens.any()

    def csrf_token(self, session: str) -> str:
        return hmac.new(self._secret, f"csrf:{session}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf_token(session), given or "")

    def identify(self, authorization: str | None, cookie: str | None) -> Identity | None:
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer":
                return None
            name = self.tokens.check(token.strip())
            return Identity(name, f"bearer:{name}", bearer=True) if name else None
        if cookie:
            s = self._sessions.get(cookie)
            if s is not None:
                if s.expires > time.time() and self.tokens.still_valid(s.digest):
                    return Identity(s.name, f"session:{cookie}")
                self._sessions.pop(cookie, None)
        if not self.tokens_required:
            return Identity(LOCAL, LOCAL)
        return None

    def login(self, token: str) -> tuple[str, str] | None:
        """(session id for the cookie, token name), or None for a wrong token."""
        name = self.tokens.check(token.strip())
        if name is None:
            return None
        now = time.time()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = Session(name, token_digest(token.strip()), now + SESSION_TTL_S)
        return sid, name

    def logout(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(cookie, None)
