"""The one interface for host side effects (comin's executor, pyinfra's connector).

The agent decides; a SystemBackend acts. `SimulatedBackend` runs the real agent code
without touching the host (tests, demo, benchmark); `NixosBackend` does what
nixos-rebuild does. Tests replace this boundary, never the MQTT client.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import pwd
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protocol.errors import FlotillaError
from protocol.models import BinaryCache

ProgressFn = Callable[[str], Awaitable[None]]
LineFn = Callable[[str, str], None]
# Where the programs a deployment runs print to (set by the runner per stage or step, so
# fetch, build, checks, dumps, migrations and switch all land in that deployment's log).
program_output: contextvars.ContextVar[LineFn | None] = contextvars.ContextVar(
    "program_output", default=None)


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
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


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

    def needs_reboot(self, toplevel: str) -> bool:
        """True when the booted kernel, initrd or modules differ from `toplevel`'s."""

    async def reboot(self) -> None:
        """Reboot the host (the agent journals before calling this)."""

    async def run_program(
        self, argv: Sequence[str], env: Mapping[str, str], user: str | None, timeout: float
    ) -> ProgramResult:
        """Run a state-step program as `user` with a timeout."""


async def run_subprocess(
    argv: Sequence[str], env: Mapping[str, str], timeout: float, user: str | None = None,
    stdin: bytes | None = None, on_line: LineFn | None = None,
) -> ProgramResult:
    """Run a program, kill its process group on timeout; never raises on exit codes.
    Each line it printed goes to `on_line(stream, line)` (default: `program_output`)."""
    result = await _run(argv, env, timeout, user, stdin)
    sink = on_line if on_line is not None else program_output.get()
    if sink is not None:
        for stream, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            for line in data.decode(errors="replace").splitlines():
                sink(stream, line)
    return result


async def _run(argv: Sequence[str], env: Mapping[str, str], timeout: float, user: str | None,
               stdin: bytes | None) -> ProgramResult:
    uid, gid = _user_switch(user)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, **env}, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, user=uid, group=gid,
        )
    except OSError as exc:
        return ProgramResult(127, b"", f"cannot run {argv[0]}: {exc.strerror}".encode())
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        out, err = await proc.communicate()
        return ProgramResult(-9, out, err, timed_out=True)
    return ProgramResult(proc.returncode if proc.returncode is not None else -1, out, err)


def _user_switch(user: str | None) -> tuple[int | None, int | None]:
    """(uid, gid) to drop to `user` when we are root and it differs from us."""
    if user is None or os.geteuid() != 0:
        return None, None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise BackendError(f"step user {user!r} does not exist on this host") from None
    if pw.pw_uid == os.geteuid():
        return None, None
    return pw.pw_uid, pw.pw_gid


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"
