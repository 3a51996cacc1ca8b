"""The agent's local control socket: people on the host answer prompts without MQTT.

A Unix stream socket at `STATE_DIR/control.sock`, mode 0660, group `wheel` by default
(falling back to the agent's primary group, with a warning, when that group does
not exist). The permission check is the file mode: the kernel refuses `connect()`
to anyone without write permission. The peer's uid (SO_PEERCRED) names the source
of an answer ("local:alice") for the journal and the "already answered by" reply.

Protocol: one JSON object per line each way.

    {"op": "list_prompts"}                                -> {"ok": true, "prompts": [PROMPT]}
    {"op": "answer", "prompt_id": P, "choices": {K: C}}   -> {"ok": bool, "message": str}
    {"op": "approve"}                                     -> {"ok": bool, "message": str}
    {"op": "approve", "defer": "defer-1h"}                -> {"ok": bool, "message": str}
    {"op": "status"}                                      -> {"ok": true, "state": HOST_STATE}

Any malformed request gets {"ok": false, "error": "..."}; the server never dies of one.

Limits, so local clients cannot exhaust the agent (its MQTT side shares the process's
descriptors and event loop): at most MAX_CLIENTS connections at once. A newcomer beyond
that takes the place of the connection idle the longest (so idle clients cannot keep
anyone out), or is told so and closed when every slot is busy with a request. A
connection idle for IDLE_TIMEOUT, or whose request or reply takes longer than
REQUEST_TIMEOUT, is closed. When the process is out of descriptors, accepting
pauses (logged once, and once when it works again) instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import math
import os
import pwd
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from protocol.models import HostState, Prompt
from protocol.prompts import DEFERRALS

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
DEFAULT_GROUP = "wheel"
MAX_LINE = 64 * 1024
CLIENT_TIMEOUT = 30.0
MAX_CLIENTS = 32
IDLE_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
STARVED_LOG_INTERVAL = 60.0
ACCEPT_RETRY = 0.5  # pause of accepting while out of descriptors
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class AgentControl(Protocol):
    """What the agent offers the socket. `source` names who asked ("local:alice")."""

    async def list_prompts(self) -> list[Prompt]: ...

    async def answer(self, prompt_id: str, choices: dict[str, str],
                     source: str) -> tuple[bool, str]:
        """First answer wins; later ones get (False, "already answered by ...")."""
        ...

    async def approve(self, source: str, defer: str | None = None) -> tuple[bool, str]:
        """Approve (or start a pending reboot now); `defer` puts an approval off."""
        ...

    async def status(self) -> HostState: ...


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def resolve_group(name: str | None) -> tuple[int, str]:
    """(gid, name) of the socket's group; the agent's primary group if `name` is unknown."""
    if name:
        try:
            g = grp.getgrnam(name)
            return g.gr_gid, g.gr_name
        except KeyError:
            pass
    gid = os.getgid()
    try:
        fallback = grp.getgrgid(gid).gr_name
    except KeyError:
        fallback = str(gid)
    if name:
        log.warning("control socket: group %r does not exist; using the agent's primary group"
                    " %s instead (only its members can answer prompts locally)", name, fallback)
    return gid, fallback


def peer_source(sock: socket.socket | None) -> str:
    """"local:USER" from the peer's credentials (Linux SO_PEERCRED)."""
    if sock is None:
        return "local:unknown"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
    except (OSError, AttributeError):
        return "local:unknown"
    try:
        return f"local:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"local:uid={uid}"


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _valid_choices(raw: Any) -> dict[str, str] | None:
    if not isinstance(raw, Mapping) or not raw:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in raw.items()):
        return None
    return dict(raw)


async def dispatch(handler: AgentControl, request: Any, source: str) -> dict[str, Any]:
    """One request -> one reply. Pure apart from the handler; never raises."""
    if not isinstance(request, dict):
        return _error("request must be a JSON object")
    op = request.get("op")
    try:
        if op == "list_prompts":
            prompts = await handler.list_prompts()
            return {"ok": True, "prompts": [p.model_dump(mode="json") for p in prompts]}
        if op == "status":
            state = await handler.status()
            return {"ok": True, "state": state.model_dump(mode="json")}
        if op == "approve":
            defer = request.get("defer")
            if defer is not None and defer not in DEFERRALS:
                return _error(f"defer must be one of {', '.join(DEFERRALS)}")
            ok, message = await handler.approve(source, defer)
            return {"ok": bool(ok), "message": message}
        if op == "answer":
            prompt_id = request.get("prompt_id")
            choices = _valid_choices(request.get("choices"))
            if not isinstance(prompt_id, str) or not prompt_id:
                return _error("answer needs a prompt_id (string)")
            if choices is None:
                return _error('answer needs choices: {"STEP.ITEM": "CHOICE", ...}')
            ok, message = await handler.answer(prompt_id, choices, source)
            return {"ok": bool(ok), "message": message}
    except Exception:
        log.exception("control socket: %s request failed", op)
        return _error(f"internal error while handling {op!r}; see the agent's log")
    return _error(f"unknown op {op!r}: use list_prompts, answer, approve or status")


class ControlServer:
    """Serves `AgentControl` on a Unix socket until closed."""

    def __init__(self, path: Path, handler: AgentControl, group: str | None = DEFAULT_GROUP,
                 max_clients: int = MAX_CLIENTS, idle_timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group_name = group
        self.gid: int | None = None
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._idle_since: dict[asyncio.Task[None], float] = {}  # waiting for a request
        self.refused = 0  # connections turned away: MAX_CLIENTS were busy
        self.evicted = 0  # idle connections closed to make room for a newcomer

    async def start(self) -> None:
        """Bind under a temporary name, set mode and group, then rename into place.

        The socket never exists at its public path with looser permissions.
        """
        self._refuse_if_live()
        gid, group = resolve_group(self.group_name)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, SOCKET_MODE)
            try:
                os.chown(tmp, -1, gid)
            except PermissionError:
                own = os.getgid()
                log.warning("control socket: cannot give %s to group %s; using gid %d",
                            self.path, group, own)
                gid = own
                os.chown(tmp, -1, gid)
            os.replace(tmp, self.path)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.gid = gid
        self._sock = sock
        self._acceptor = asyncio.create_task(self._accept_loop(sock), name="control-accept")
        self._warn_if_unreachable(gid)
        log.info("control socket at %s (mode %o, group %s)", self.path, SOCKET_MODE, group)

    def _refuse_if_live(self) -> None:
        """Replace a stale socket; refuse to steal one another process still serves."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            return  # nobody listens: stale, replaced below
        finally:
            probe.close()
        raise FileExistsError(f"another process serves {self.path}")

    def _warn_if_unreachable(self, gid: int) -> None:
        """Group members also need search permission on the state directory."""
        parent = self.path.parent
        try:
            st = os.stat(parent)
        except OSError:
            return
        can_search = bool(st.st_mode & stat.S_IXOTH) or (
            st.st_gid == gid and bool(st.st_mode & stat.S_IXGRP))
        if not can_search:
            log.warning("control socket: members of the socket's group cannot enter %s"
                        " (mode %o); give it group x (e.g. 0710, group %d) for"
                        " `fleet-agent prompt` to work", parent, stat.S_IMODE(st.st_mode), gid)

    async def close(self) -> None:
        tasks = [t for t in (self._acceptor, *self._clients) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._acceptor = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        crowded = False
        # Out of descriptors: said once per STARVED_LOG_INTERVAL, not at every flap (an
        # evicted client frees one descriptor, the next accept takes it, ...).
        announced, said_at = False, -math.inf
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise
                if not announced and loop.time() - said_at >= STARVED_LOG_INTERVAL:
                    log.warning("control socket: cannot accept local clients (%s); pausing"
                                " until descriptors are free again", exc.strerror)
                    announced, said_at = True, loop.time()
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            if announced:
                log.info("control socket: accepting local clients again")
                announced = False
            if len(self._clients) >= self.max_clients and not self._evict_idlest():
                self.refused += 1
                if not crowded:
                    log.warning("control socket: %d clients busy; refusing more until some"
                                " finish", len(self._clients))
                crowded = True
                _refuse(conn, f"the agent serves {self.max_clients} local clients already;"
                              " try again later")
                continue
            crowded = False
            task = asyncio.create_task(self._client(conn), name="control-client")
            self._clients.add(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._clients.discard(task)
        self._idle_since.pop(task, None)

    def _evict_idlest(self) -> bool:
        """Close the connection idle the longest; False when none is idle."""
        if not self._idle_since:
            return False
        task = min(self._idle_since, key=self._idle_since.__getitem__)
        self._forget(task)  # its slot is free now; the task closes its socket as it ends
        task.cancel()
        self.evicted += 1
        return True

    async def _client(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE)
        except OSError:
            conn.close()
            return
        await self._serve(reader, writer)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = peer_source(writer.get_extra_info("socket"))
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            while True:
                if me is not None and me in self._clients:
                    self._idle_since[me] = loop.time()
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, _error(f"request longer than {MAX_LINE} bytes"))
                    return
                except TimeoutError:
                    return  # idle (or trickling a line byte by byte): the slot is freed
                if not line:
                    return
                if me is not None:
                    self._idle_since.pop(me, None)
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    await self._reply(writer, _error("request is not valid JSON"))
                    continue
                try:
                    reply = await asyncio.wait_for(dispatch(self.handler, request, source),
                                                   self.request_timeout)
                except TimeoutError:
                    reply = _error(f"the agent did not handle the request within "
                                   f"{self.request_timeout:g}s")
                await self._reply(writer, reply)
        except (ConnectionError, BrokenPipeError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        """A client that does not read its reply is dropped after REQUEST_TIMEOUT."""
        writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), self.request_timeout)


def _refuse(conn: socket.socket, message: str) -> None:
    """One error line (if the client's buffer takes it without waiting), then close."""
    with conn:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.send(json.dumps(_error(message)).encode() + b"\n")


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense."""


class ControlClient:
    """Blocking client (the CLI is synchronous); one connection per request."""

    def __init__(self, path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                return self.exchange(sock, obj)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {self.path}: is fleet-agent running"
                               " (and is --state-dir right)?") from None
        except PermissionError:
            raise ControlError(f"permission denied on {self.path}: you need to be root or in"
                               " the socket's group (see `ls -l` of it)") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {self.path}: is fleet-agent running?"
                               ) from None
        except TimeoutError:
            raise ControlError(f"the agent did not answer within {self.timeout:g}s") from None
        except OSError as exc:
            raise ControlError(f"cannot use {self.path}: {exc.strerror or exc}") from None

    def exchange(self, sock: socket.socket, obj: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply on a connected socket. An agent that refuses the
        connection (busy) sends one line and closes, perhaps before it read ours: the
        send then fails, and the line already sent says why."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps(obj).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 16 * MAX_LINE:
                raise ControlError("reply from the agent is too large")
        if not buf:
            raise ControlError("the agent closed the connection without a reply")
        try:
            reply = json.loads(buf)
        except ValueError:
            raise ControlError("the agent sent an invalid reply") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError("the agent sent an invalid reply")
        return reply

    def list_prompts(self) -> list[Prompt]:
        reply = self.request({"op": "list_prompts"})
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "list_prompts refused")))
        try:
            return [Prompt.model_validate(p) for p in reply.get("prompts", [])]
        except ValueError as exc:
            raise ControlError(f"the agent sent an invalid prompt: {exc}") from None

    def status(self) -> HostState:
        reply = self.request({"op": "status"})
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "status refused")))
        try:
            return HostState.model_validate(reply["state"])
        except (KeyError, ValueError) as exc:
            raise ControlError(f"the agent sent an invalid state: {exc}") from None

    def answer(self, prompt_id: str, choices: dict[str, str]) -> tuple[bool, str]:
        reply = self.request({"op": "answer", "prompt_id": prompt_id, "choices": choices})
        return bool(reply.get("ok")), str(reply.get("message") or reply.get("error") or "")

    def approve(self, defer: str | None = None) -> tuple[bool, str]:
        reply = self.request({"op": "approve"} if defer is None
                             else {"op": "approve", "defer": defer})
        return bool(reply.get("ok")), str(reply.get("message") or reply.get("error") or "")
