"""The agent's local control socket (issue 6): protocol, first answer wins, permissions."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import select
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from client.ask.control import (
    ControlClient,
    ControlError,
    ControlServer,
    resolve_group,
    socket_path,
)
from protocol.models import Choice, HostState, Prompt, ReportItem

HOST = "web1"
IS_ROOT = os.geteuid() == 0


class InTestAgent:
    """A small AgentControl: one open prompt, first answer wins, approval once."""

    def __init__(self) -> None:
        self.prompts = {"p-1": Prompt(
            host=HOST, prompt_id="p-1", deployment_id="d-1", generation=3, created_at=1.0,
            items=[ReportItem(step="db", id="schema", severity="warning", message="migrate?",
                              choices=[Choice(id="migrate"), Choice(id="drop", destructive=True)],
                              default="migrate")])}
        self.answered: dict[str, tuple[dict[str, str], str]] = {}
        self.approved_by: str | None = None
        self.lock = asyncio.Lock()
        self.fail_status = False

    async def list_prompts(self) -> list[Prompt]:
        return [p for pid, p in self.prompts.items() if pid not in self.answered]

    async def answer(self, prompt_id: str, choices: dict[str, str],
                     source: str) -> tuple[bool, str]:
        async with self.lock:
            if prompt_id in self.answered:
                return False, f"already answered by {self.answered[prompt_id][1]}"
            if prompt_id not in self.prompts:
                return False, f"no open prompt {prompt_id}"
            await asyncio.sleep(0.01)  # widen the race window for the concurrency test
            self.answered[prompt_id] = (choices, source)
            return True, f"recorded {prompt_id}"

    async def approve(self, source: str, defer: str | None = None) -> tuple[bool, str]:
        if self.approved_by is not None:
            return False, f"already approved by {self.approved_by}"
        self.approved_by = source
        return True, "approved"

    async def status(self) -> HostState:
        if self.fail_status:
            raise RuntimeError("boom")
        return HostState(host=HOST, phase="awaiting_choice", open_prompt="p-1", updated_at=2.0)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A state dir anyone may enter, so only the socket's own mode decides who connects."""
    d = Path(tempfile.mkdtemp(prefix="flotilla-ctl-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def spare_group() -> tuple[int, str]:
    """A real group that is neither root's nor nobody's, for membership checks."""
    for name in ("daemon", "bin", "sys", "adm", "users"):
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue
        if g.gr_gid not in (0, os.getgid()):
            return g.gr_gid, g.gr_name
    pytest.fail("no spare system group on this machine")


@pytest.fixture
async def served(open_dir: Path) -> AsyncIterator[tuple[ControlServer, InTestAgent]]:
    agent = InTestAgent()
    server = ControlServer(socket_path(open_dir), agent, group=spare_group()[1])
    await server.start()
    yield server, agent
    await server.close()


async def call(server: ControlServer, obj: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(ControlClient(server.path, timeout=5).request, obj)


async def raw(server: ControlServer, data: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(server.path), limit=1 << 20)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    replies = []
    while line := await reader.readline():
        replies.append(json.loads(line))
    writer.close()
    return replies


# -- protocol -------------------------------------------------------------------------------

async def test_list_answer_status_approve(served: tuple[ControlServer, InTestAgent]) -> None:
    server, agent = served
    client = ControlClient(server.path, timeout=5)
    prompts = await asyncio.to_thread(client.list_prompts)
    assert [p.prompt_id for p in prompts] == ["p-1"]
    assert prompts[0].items[0].choices[1].destructive is True
    state = await asyncio.to_thread(client.status)
    assert state.phase == "awaiting_choice" and state.open_prompt == "p-1"
    ok, msg = await asyncio.to_thread(client.answer, "p-1", {"db.schema": "migrate"})
    assert ok and msg == "recorded p-1"
    assert agent.answered["p-1"] == ({"db.schema": "migrate"}, "local:root" if IS_ROOT else
                                     f"local:{pwd.getpwuid(os.geteuid()).pw_name}")
    assert await asyncio.to_thread(client.list_prompts) == []
    assert await asyncio.to_thread(client.approve) == (True, "approved")


async def test_first_answer_wins(served: tuple[ControlServer, InTestAgent]) -> None:
    server, agent = served
    replies = await asyncio.gather(*[
        call(server, {"op": "answer", "prompt_id": "p-1", "choices": {"db.schema": c}})
        for c in ("migrate", "drop", "migrate", "drop")])
    assert sorted(r["ok"] for r in replies) == [False, False, False, True]
    losers = [r for r in replies if not r["ok"]]
    assert all(r["message"].startswith("already answered by local:") for r in losers)
    winner = next(r for r in replies if r["ok"])
    assert winner["message"] == "recorded p-1" and len(agent.answered) == 1


@pytest.mark.parametrize(("request_line", "error"), [
    (b"not json\n", "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
    (b'{"op": "answer", "prompt_id": "p-1"}\n', "answer needs choices"),
    (b'{"op": "answer", "prompt_id": "p-1", "choices": {"a": 1}}\n', "answer needs choices"),
    (b'{"op": "answer", "choices": {"a": "b"}}\n', "answer needs a prompt_id"),
])
async def test_malformed_requests_get_an_error_and_the_server_lives_on(
        served: tuple[ControlServer, InTestAgent], request_line: bytes, error: str) -> None:
    server, _ = served
    replies = await raw(server, request_line + b'{"op": "status"}\n')
    assert replies[0]["ok"] is False and error in replies[0]["error"]
    assert replies[1]["ok"] is True  # same connection still served


async def test_oversized_request_is_refused(served: tuple[ControlServer, InTestAgent]) -> None:
    server, _ = served
    replies = await raw(server, b'{"op": "' + b"x" * 100_000 + b'"}\n')
    assert replies == [{"ok": False, "error": "request longer than 65536 bytes"}]
    assert (await call(server, {"op": "status"}))["ok"] is True


async def test_handler_failure_is_an_error_reply(served: tuple[ControlServer, InTestAgent],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    server, agent = served
    agent.fail_status = True
    with caplog.at_level(logging.ERROR):
        reply = await call(server, {"op": "status"})
    assert reply["ok"] is False and "internal error" in reply["error"]
    assert "boom" in caplog.text
    agent.fail_status = False
    assert (await call(server, {"op": "status"}))["ok"] is True


def test_client_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no control socket"):
        ControlClient(tmp_path / "control.sock").request({"op": "status"})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "dead.sock"))  # bound, never listening
    try:
        with pytest.raises(ControlError, match="nothing listens"):
            ControlClient(tmp_path / "dead.sock").request({"op": "status"})
    finally:
        sock.close()


# -- the socket file ------------------------------------------------------------------------

async def test_socket_mode_and_group(served: tuple[ControlServer, InTestAgent]) -> None:
    server, _ = served
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == spare_group()[0] == server.gid
    assert not list(server.path.parent.glob(".control.sock.*"))  # temp name renamed away


def test_missing_group_falls_back_to_primary_group(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        gid, _ = resolve_group("no-such-group-flotilla")
    assert gid == os.getgid()
    assert "no-such-group-flotilla" in caplog.text and "does not exist" in caplog.text


async def test_default_group_wheel_or_fallback(open_dir: Path) -> None:
    server = ControlServer(socket_path(open_dir), InTestAgent())  # default: wheel
    await server.start()
    try:
        try:
            expected = grp.getgrnam("wheel").gr_gid
        except KeyError:
            expected = os.getgid()
        assert os.stat(server.path).st_gid == expected
    finally:
        await server.close()
    assert not server.path.exists()


async def test_stale_socket_is_replaced_and_a_live_one_is_not(open_dir: Path) -> None:
    path = socket_path(open_dir)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed agent's leftover
    server = ControlServer(path, InTestAgent(), group=None)
    await server.start()
    try:
        assert (await call(server, {"op": "status"}))["ok"] is True
        second = ControlServer(path, InTestAgent(), group=None)
        with pytest.raises(FileExistsError, match="another process"):
            await second.start()
        assert (await call(server, {"op": "status"}))["ok"] is True
    finally:
        await server.close()


def test_warns_when_group_cannot_enter_the_state_dir(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    server = ControlServer(socket_path(d), InTestAgent(), group=None)
    with caplog.at_level(logging.WARNING):
        server._warn_if_unreachable(12345)
    assert "cannot enter" in caplog.text


# -- a second uid -------------------------------------------------------------------------

CHILD = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(13)
s.sendall(json.dumps({"op": "answer", "prompt_id": "p-1",
                      "choices": {"db.schema": "migrate"}}).encode() + b"\n")
print(s.makefile().readline().strip())
"""


async def run_as_nobody(path: Path, extra_groups: list[int]) -> tuple[int, str]:
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    proc = await asyncio.create_subprocess_exec(
        python, "-I", "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, user="nobody", group=grp.getgrnam("nogroup").gr_gid
        if _has_group("nogroup") else pwd.getpwnam("nobody").pw_gid,
        extra_groups=extra_groups, cwd="/")
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, (out + err).decode()


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


async def test_a_uid_outside_the_group_is_denied(
        served: tuple[ControlServer, InTestAgent]) -> None:
    server, agent = served
    mode = stat.S_IMODE(os.stat(server.path).st_mode)
    assert mode & 0o007 == 0  # no permission for others: the kernel refuses connect()
    if not IS_ROOT:
        return  # no second uid without root: the mode check above is what we can do
    rc, out = await run_as_nobody(server.path, extra_groups=[])
    assert rc == 13 and "EACCES" in out, out
    assert agent.answered == {}
    # the same uid as a member of the socket's group gets through: it was the mode
    rc, out = await run_as_nobody(server.path, extra_groups=[spare_group()[0]])
    assert rc == 0, out
    assert json.loads(out)["ok"] is True
    assert agent.answered["p-1"][1] == "local:nobody"


# -- issue 11 item 6: limits, so local clients cannot exhaust the agent ------------------------

@pytest.fixture
async def small(open_dir: Path) -> AsyncIterator[tuple[ControlServer, InTestAgent]]:
    agent = InTestAgent()
    server = ControlServer(socket_path(open_dir), agent, group=spare_group()[1],
                           max_clients=3, idle_timeout=60, request_timeout=0.5)
    await server.start()
    yield server, agent
    await server.close()


async def idle_client(server: ControlServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(server.path))


async def test_idle_clients_cannot_keep_a_newcomer_out(
        small: tuple[ControlServer, InTestAgent]) -> None:
    server, _ = small
    idle = [await idle_client(server) for _ in range(10)]
    reply = await call(server, {"op": "status"})
    assert reply["ok"] is True
    assert server.clients <= 3 and server.evicted >= 8
    closed = 0
    for reader, _writer in idle[:8]:  # the oldest were evicted: their connection is closed
        if await asyncio.wait_for(reader.read(), 10) == b"":
            closed += 1
    for _, writer in idle:
        writer.close()
    assert closed == 8


async def test_idle_connections_are_closed_after_the_idle_timeout(open_dir: Path) -> None:
    server = ControlServer(socket_path(open_dir), InTestAgent(), group=spare_group()[1],
                           idle_timeout=0.3)
    await server.start()
    try:
        reader, writer = await idle_client(server)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert (await call(server, {"op": "status"}))["ok"] is True
    finally:
        await server.close()


async def test_a_client_refused_before_it_sent_its_request_still_gets_the_reason(
        open_dir: Path) -> None:
    """A busy agent refuses a connection with one line and closes it, maybe before the
    client has sent its request: the client's send then fails (EPIPE), and it must still
    show the reason it was already sent, not "Broken pipe" (seen in a full test run)."""
    agent = InTestAgent()
    server = ControlServer(socket_path(open_dir), agent, group=spare_group()[1],
                           max_clients=3, idle_timeout=60, request_timeout=30)
    await server.start()
    hang = asyncio.Event()

    async def status() -> HostState:
        await hang.wait()
        raise AssertionError("released")

    agent.status = status  # type: ignore[method-assign]
    busy = [asyncio.create_task(call(server, {"op": "status"})) for _ in range(3)]
    try:
        for _ in range(500):
            if server.clients == 3:
                break
            await asyncio.sleep(0.01)
        assert server.clients == 3

        def refused_first() -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(server.path))
                hup = select.poll()
                hup.register(sock, select.POLLRDHUP)
                assert hup.poll(5000), "the agent did not close the connection"
                return ControlClient(server.path).exchange(sock, {"op": "status"})

        reply = await asyncio.to_thread(refused_first)
        assert "serves 3 local clients already" in reply["error"]
    finally:
        hang.set()
        await asyncio.gather(*busy, return_exceptions=True)
        await server.close()


async def test_a_hung_request_gets_an_error_and_busy_slots_refuse_with_a_reason(
        small: tuple[ControlServer, InTestAgent]) -> None:
    server, agent = small
    hang = asyncio.Event()

    async def status() -> HostState:
        await hang.wait()
        raise AssertionError("not reached")

    agent.status = status  # type: ignore[method-assign]
    replies = await asyncio.gather(*(call(server, {"op": "status"}) for _ in range(5)))
    errors = sorted(r["error"] for r in replies)
    assert errors.count("the agent did not handle the request within 0.5s") >= 3
    assert all("did not handle" in e or "serves 3 local clients already" in e for e in errors)
    assert (await call(server, {"op": "list_prompts"}))["ok"] is True  # the server lives on
