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
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
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

    def __init__(self, path: Path, handler: AgentControl, group: str | None = DEFAULT_GROUP
                 ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group_name = group
        self.gid: int | None = None
        self._server: asyncio.base_events.Server | None = None

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
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=MAX_LINE)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.gid = gid
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
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = peer_source(writer.get_extra_info("socket"))
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, _error(f"request longer than {MAX_LINE} bytes"))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    await self._reply(writer, _error("request is not valid JSON"))
                    continue
                await self._reply(writer, await dispatch(self.handler, request, source))
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        await writer.drain()


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
                sock.sendall(json.dumps(obj).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > 16 * MAX_LINE:
                        raise ControlError("reply from the agent is too large")
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
