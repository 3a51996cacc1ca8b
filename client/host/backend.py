"""The one interface for host side effects (comin's executor, pyinfra's connector).

The agent decides; a SystemBackend acts. `SimulatedBackend` runs the real agent code
without touching the host (tests, demo, benchmark); `NixosBackend` does what
nixos-rebuild does. Tests replace this boundary, never the MQTT client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import pwd
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protocol.errors import FlotillaError
from protocol.models import BinaryCache

log = logging.getLogger(__name__)
ProgressFn = Callable[[str], Awaitable[None]]
LineFn = Callable[[str, str], None]
# Where the programs a deployment runs print to, when the caller passes no `on_line`
# (set by the runner per stage or step, so every program lands in that deployment's log).
program_output: contextvars.ContextVar[LineFn | None] = contextvars.ContextVar(
    "program_output", default=None)

RUN_MARKER = "FLOTILLA_RUN"  # in every program's environment: finds what it left behind
STDOUT_CAP = 1 << 20  # stdout kept whole up to this (a check's JSON report)
TAIL_BYTES = 64 << 10  # the end of each stream kept for error messages
TAIL_LINES = 20
LINE_MAX = 8 << 10  # longer lines reach the hook cut, with a note of what was left out
HOOK_BUDGET = 16 << 20  # output handed to the line hook per run, at most ...
HOOK_LINES = 200_000  # ... and at most this many lines
EXIT_GRACE = 2.0  # after the program exited, how long its pipes may stay open


class BackendError(FlotillaError):
    """A host operation failed; the message is shown to the operator."""


@dataclass(frozen=True)
class SwitchOutcome:
    """What switch-to-configuration said: exit 4 = some units failed; `inhibited` = the
    switch was refused by switch inhibitors (nothing activated; `boot` would work);
    `reboot_required` = the backend knows a reboot must follow."""

    exit_code: int = 0
    units_failed: bool = False
    reboot_required: bool = False
    inhibited: bool = False


@dataclass(frozen=True)
class ProgramResult:
    """What a program did. `stdout` is its first STDOUT_CAP bytes (`stdout_size` says how
    much it printed); `stderr` and `stdout_tail` are the last TAIL_BYTES of each stream;
    `leftovers` counts the background processes it left behind (they were killed)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    stdout_size: int = -1
    stdout_tail: bytes | None = None
    leftovers: int = 0

    @property
    def stdout_overflow(self) -> bool:
        return self.stdout_size > len(self.stdout)

    def tail_text(self, n: int = 400) -> str:
        """The end of its output on one line (stderr, else stdout), for error messages."""
        raw = self.stderr.strip() or (self.stdout if self.stdout_tail is None
                                      else self.stdout_tail)
        return raw.decode(errors="replace").strip()[-n:].replace("\n", " | ")


class SystemBackend(Protocol):
    name: str

    def current_system(self) -> str | None:
        """The system the host runs now (the `/run/current-system` target)."""

    def boot_id(self) -> str:
        """Changes on every boot; a journaled reboot is complete when it differs."""

    async def fetch(self, system: str, host: str, progress: ProgressFn,
                    cache: BinaryCache | None = None) -> str:
        """Make `system` (store path or flake ref) present, from `cache` (signatures
        checked against its key) when given; return its toplevel path."""

    async def switch(self, toplevel: str, action: str, progress: ProgressFn,
                     install_bootloader: bool = False) -> SwitchOutcome:
        """Activate `toplevel` with `action` (switch, boot, test, dry-activate)."""

    async def rollback(self, previous: str | None, progress: ProgressFn) -> None:
        """Return to the previous generation (profile and activation)."""

    def agent_unit_changed(self, previous: str | None, toplevel: str) -> bool:
        """True when `toplevel` carries another unit file for the agent than `previous`
        (a switch does not restart the agent: it restarts itself once done)."""

    async def restart_agent(self) -> None:
        """Have the service manager restart the agent (after a finished deployment)."""

    def needs_reboot(self, toplevel: str) -> bool:
        """True when the booted kernel, initrd or modules differ from `toplevel`'s."""

    async def reboot(self) -> None:
        """Reboot the host (the agent journals before calling this)."""

    async def run_program(
        self, argv: Sequence[str], env: Mapping[str, str], user: str | None, timeout: float,
        on_line: LineFn | None = None,
    ) -> ProgramResult:
        """Run a state-step program as `user` with a timeout (see `run_subprocess`)."""


async def run_subprocess(
    argv: Sequence[str], env: Mapping[str, str], timeout: float, user: str | None = None,
    stdin: bytes | None = None, on_line: LineFn | None = None, *,
    scope: bool = False, stdout_cap: int = STDOUT_CAP,
) -> ProgramResult:
    """Run a program in its own session (and systemd scope when `scope`); never raises on
    exit codes.

    Each line it prints goes to `on_line(stream, line)` (default: `program_output`) as it
    arrives; only bounded output is kept (the first `stdout_cap` bytes of stdout, the last
    TAIL_BYTES of each stream). When the program exits, or on timeout, every process
    still carrying this run's marker (or in its scope) is killed; reading stops once its
    pipes close, or EXIT_GRACE after the exit when something unkillable still holds them.
    """
    sink = on_line if on_line is not None else program_output.get()
    run_id = uuid.uuid4().hex
    pw = _user_switch(user)
    uid, gid = (pw.pw_uid, pw.pw_gid) if pw is not None else (None, None)
    cmd = scope_command(argv, run_id, uid, gid) if scope else list(argv)
    # As the step's user: its own home and groups, never the agent's (root's).
    as_user = ({"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
               if pw is not None else {})
    loop = asyncio.get_running_loop()
    budget = _Budget(HOOK_BUDGET, HOOK_LINES)
    out = _Collector("stdout", sink, budget, head=stdout_cap)
    err = _Collector("stderr", sink, budget, head=0)
    transports: list[asyncio.BaseTransport] = []
    fds: list[int] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        for _ in range(2):
            fds += os.pipe()
        r_out, w_out, r_err, w_err = fds
        try:
            drop = not scope and pw is not None
            proc = await asyncio.create_subprocess_exec(
                *cmd, env={**os.environ, **as_user, **env, RUN_MARKER: run_id},
                cwd="/" if pw is not None else None,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=w_out, stderr=w_err, start_new_session=True,
                user=uid if drop else None, group=gid if drop else None,
                extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid) if pw and drop else None)
        finally:
            for fd in (w_out, w_err):
                os.close(fd)
                fds.remove(fd)
        for fd, collector in ((r_out, out), (r_err, err)):
            pipe = os.fdopen(fd, "rb", buffering=0)
            fds.remove(fd)
            try:
                transport, _ = await loop.connect_read_pipe(lambda c=collector: c, pipe)  # type: ignore[misc]
            except BaseException:
                pipe.close()
                raise
            transports.append(transport)
    except OSError as exc:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for t in transports:
            t.close()
        if proc is not None:
            _kill_now(proc.pid, run_id)
        return ProgramResult(127, b"", f"cannot run {argv[0]}: {exc.strerror}".encode())
    feeder = asyncio.ensure_future(_feed(proc, stdin)) if stdin is not None else None
    timed_out = False
    try:
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
        except TimeoutError:
            timed_out = True
            await kill_tree(proc.pid, run_id, scope)
            await proc.wait()
        leftovers = await kill_tree(proc.pid, run_id, scope)
        closed = [out.closed, err.closed]
        await asyncio.wait(closed, timeout=EXIT_GRACE)
        held = not all(f.done() for f in closed)
    except asyncio.CancelledError:
        _kill_now(proc.pid, run_id)
        raise
    finally:
        if feeder is not None:
            feeder.cancel()
        for t in transports:
            t.close()
    if leftovers:
        note = (f"flotilla: {argv[0]} left {leftovers} background process"
                f"{'es' if leftovers != 1 else ''} behind; killed")
        log.warning("%s", note)
        err.note(note)
    if held:
        note = (f"flotilla: {argv[0]} exited but something still holds its output open;"
                f" stopped reading after {EXIT_GRACE:g}s")
        log.warning("%s", note)
        err.note(note)
    code = -9 if timed_out else (proc.returncode if proc.returncode is not None else -1)
    return ProgramResult(code, out.head_bytes(), err.tail_bytes(), timed_out=timed_out,
                         stdout_size=out.size, stdout_tail=out.tail_bytes(),
                         leftovers=leftovers)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    with contextlib.suppress(OSError):
        proc.stdin.close()


class _Budget:
    """How much output a run may still hand to its line hook (shared by both streams)."""

    def __init__(self, nbytes: int, lines: int) -> None:
        self.bytes, self.lines = nbytes, lines
        self.spent = False

    def take(self, n: int) -> bool:
        self.bytes -= n
        self.lines -= 1
        return self.bytes > 0 and self.lines > 0


class _Collector(asyncio.Protocol):
    """One output pipe: bounded head/tail kept, lines handed to the hook as they arrive."""

    def __init__(self, name: str, sink: LineFn | None, budget: _Budget, head: int) -> None:
        self.name, self.sink, self.budget, self.head_cap = name, sink, budget, head
        self.head = bytearray()
        self.tail = bytearray()
        self.size = 0
        self.partial = bytearray()
        self.dropped = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < self.head_cap:
            self.head += data[: self.head_cap - len(self.head)]
        self.tail += data
        if len(self.tail) > TAIL_BYTES:
            del self.tail[:-TAIL_BYTES]
        if self.sink is not None and not self.budget.spent:
            self._split(data)

    def _split(self, data: bytes) -> None:
        start = 0
        while not self.budget.spent:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            room = LINE_MAX - len(self.partial)
            self.partial += piece[:max(0, room)]
            self.dropped += max(0, len(piece) - max(0, room))
            if nl < 0:
                return
            self._emit()
            start = nl + 1

    def _emit(self) -> None:
        raw, dropped = bytes(self.partial), self.dropped
        self.partial.clear()
        self.dropped = 0
        text = raw.decode(errors="replace").rstrip("\r")
        if dropped:
            text += f" [… {dropped} more bytes]"
        self._send(text)
        if not self.budget.take(len(raw) + dropped + 1):
            self.budget.spent = True
            self._send(f"flotilla: more output than {HOOK_BUDGET >> 20} MiB or {HOOK_LINES}"
                       " lines; the rest is not logged (its last lines are kept)")

    def _send(self, text: str) -> None:
        if self.sink is None:
            return
        try:
            self.sink(self.name, text)
        except Exception:  # a broken log must not break the program run
            log.exception("program output hook failed; output of this run is not logged")
            self.sink = None

    def note(self, text: str) -> None:
        """A line from the agent itself about this run (kept in the tail, logged)."""
        self.tail += b"\n" + text.encode() + b"\n"
        self._send(text)

    def connection_lost(self, exc: Exception | None) -> None:
        if (self.partial or self.dropped) and self.sink is not None and not self.budget.spent:
            self._emit()
        if self.budget.spent and self.sink is not None:
            for line in _last_lines(bytes(self.tail), TAIL_LINES):
                self._send(line)
        if not self.closed.done():
            self.closed.set_result(None)

    def head_bytes(self) -> bytes:
        return bytes(self.head)

    def tail_bytes(self) -> bytes:
        return bytes(self.tail)


def _last_lines(data: bytes, n: int) -> list[str]:
    return [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()][-n:]


# -- the process tree of one run ------------------------------------------------------------

def scope_unit(run_id: str) -> str:
    return f"flotilla-run-{run_id[:16]}"


def scope_command(argv: Sequence[str], run_id: str, uid: int | None, gid: int | None
                  ) -> list[str]:
    """The program in its own transient scope (a cgroup: every descendant stays in it)."""
    cmd = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={scope_unit(run_id)}"]
    if uid is not None:
        cmd += [f"--uid={uid}", f"--gid={gid}"]
    return [*cmd, "--", *argv]


def scope_kill_command(run_id: str) -> list[str]:
    return ["systemctl", "kill", "--signal=SIGKILL", f"{scope_unit(run_id)}.scope"]


def find_marked(run_id: str, proc: Path = Path("/proc")) -> list[int]:
    """Processes whose environment carries this run's marker (all of its descendants
    that did not clear their environment)."""
    marker = f"{RUN_MARKER}={run_id}".encode()
    found = []
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "environ"), "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(run_id: str) -> int:
    """SIGKILL every marked process until none is left; returns how many there were."""
    killed: set[int] = set()
    quiet = 0
    for _ in range(20):
        fresh = [p for p in find_marked(run_id) if p not in killed]
        if not fresh:
            # A process in the middle of execve shows an empty environ for a moment:
            # only a second empty look, a moment later, means none is left.
            quiet += 1
            if quiet == 2:
                break
            time.sleep(0.01)
            continue
        quiet = 0
        for pid in fresh:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    return len(killed)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


async def kill_tree(pid: int, run_id: str, scope: bool) -> int:
    """Kill what is left of one run: marked processes (counted), its process group, its
    scope. Returns how many marked processes were still alive."""
    n = await asyncio.to_thread(kill_marked, run_id)
    _kill_group(pid)
    if scope:
        with contextlib.suppress(OSError, TimeoutError):
            proc = await asyncio.create_subprocess_exec(
                *scope_kill_command(run_id), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.wait_for(proc.wait(), 30)
    return n


def _kill_now(pid: int, run_id: str) -> None:
    """Synchronous kill for a cancelled run (the agent is stopping)."""
    _kill_group(pid)
    kill_marked(run_id)


def program_owner(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) a step's programs run as, when that is not the agent itself."""
    pw = _user_switch(user)
    return None if pw is None else (pw.pw_uid, pw.pw_gid)


def _user_switch(user: str | None) -> pwd.struct_passwd | None:
    """The user to drop to when we are root and `user` is someone else."""
    if user is None or os.geteuid() != 0:
        return None
    pw = user_entry(user)
    return None if pw.pw_uid == os.geteuid() else pw


def user_entry(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise BackendError(f"step user {user!r} does not exist on this host") from None


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"
