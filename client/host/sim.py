"""Simulated backend: the real agent, a pretend host.

Fetch and switch sleep for configurable delays and fail on demand, so tests, the
demo and the benchmark exercise the real agent code. The "current system" and boot
id live in files under the agent's state dir, so they survive agent restarts.
State-step programs really run (as the step's `user` when the agent is root), so
migration, dump and restore tests are real.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.host.backend import (
    BackendError,
    LineFn,
    ProgramResult,
    ProgressFn,
    SwitchOutcome,
    run_subprocess,
)
from protocol.models import BinaryCache


@dataclass(frozen=True)
class SimSettings:
    fetch_delay: float = 0.0
    switch_delay: float = 0.0
    fail_rate: float = 0.0
    fail_stage: str = "switch"
    seed: str = ""
    system: str | None = None  # what a new simulated host runs before its first deploy


class SimulatedBackend:
    name = "sim"

    def __init__(self, state_dir: Path, host: str, settings: SimSettings | None = None) -> None:
        self.dir = state_dir / "sim"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.settings = settings or SimSettings()
        self.switches: list[tuple[str, str]] = []
        # Read once, then kept with every write: this process is the only writer (a
        # simulated reboot is a restart of the agent, which reads the files again).
        self._current: str | None = None
        self._boot: str | None = None
        if self.settings.system and not (self.dir / "boot-id").exists():  # a new host
            (self.dir / "profile").write_text(self.settings.system)
            self._set_current(self.settings.system)
        self._note_boot()

    def _note_boot(self) -> None:
        """On the first start after a (simulated) reboot, the profile is what booted."""
        boot = self.boot_id()
        marker = self.dir / "booted-for"
        if not marker.exists() or marker.read_text() != boot:
            profile = self.dir / "profile"
            (self.dir / "booted-system").write_text(
                profile.read_text() if profile.exists() else "")
            marker.write_text(boot)

    def _fails(self, stage: str, system: str) -> bool:
        s = self.settings
        if stage != s.fail_stage or s.fail_rate <= 0:
            return f"sim-fail-{stage}" in system
        digest = hashlib.sha256(f"{s.seed}|{self.host}|{system}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < s.fail_rate

    def current_system(self) -> str | None:
        if self._current is None:
            f = self.dir / "current-system"
            self._current = f.read_text() if f.exists() else ""
        return self._current or None

    def _set_current(self, system: str | None) -> None:
        f = self.dir / "current-system"
        if system is None:
            f.unlink(missing_ok=True)
        else:
            f.write_text(system)
        self._current = system or ""

    def boot_id(self) -> str:
        if self._boot is None:
            f = self.dir / "boot-id"
            if not f.exists():
                f.write_text(str(uuid.uuid4()))
            self._boot = f.read_text().strip()
        return self._boot

    async def fetch(self, system: str, host: str, progress: ProgressFn,
                    cache: BinaryCache | None = None) -> str:
        if self.settings.fetch_delay:
            await asyncio.sleep(self.settings.fetch_delay)
        if self._fails("fetch", system):
            raise BackendError(f"simulated fetch failure for {system}")
        return system

    async def switch(self, toplevel: str, action: str, progress: ProgressFn,
                     install_bootloader: bool = False) -> SwitchOutcome:
        if self.settings.switch_delay:
            await asyncio.sleep(self.settings.switch_delay)
        if self._fails("switch", toplevel):
            raise BackendError(f"simulated activation failure of {toplevel}")
        self.switches.append((toplevel, action))
        if action == "dry-activate":
            await progress(f"would activate {toplevel}")
            return SwitchOutcome()
        if action != "test":
            (self.dir / "profile").write_text(toplevel)
        if action != "boot":
            self._set_current(toplevel)
        return SwitchOutcome()

    def agent_unit_changed(self, previous: str | None, toplevel: str) -> bool:
        return False

    async def restart_agent(self) -> None:
        return None

    async def rollback(self, previous: str | None, progress: ProgressFn) -> None:
        await progress(f"rolling back to {previous}" if previous is not None else
                       "rolling back (no earlier system recorded)")
        self._set_current(previous)
        profile = self.dir / "profile"
        if previous is None:
            profile.unlink(missing_ok=True)
        else:
            profile.write_text(previous)

    def needs_reboot(self, toplevel: str) -> bool:
        """A toplevel with a `sim-needs-reboot` file has a new kernel: it needs a reboot
        until it is the system that booted."""
        booted = self.dir / "booted-system"
        return (Path(toplevel) / "sim-needs-reboot").exists() and (
            not booted.exists() or booted.read_text() != toplevel)

    async def reboot(self) -> None:
        """Like a real reboot: the next boot has a new id, and this process waits to be
        killed (restart the agent to simulate the boot)."""
        (self.dir / "boot-id").write_text(str(uuid.uuid4()))
        self._boot = None  # as before, the file is what the next boot_id() reads
        await asyncio.sleep(3600)
        raise BackendError("simulated reboot: the agent was not restarted")

    async def run_program(
        self, argv: Sequence[str], env: Mapping[str, str], user: str | None, timeout: float,
        on_line: LineFn | None = None,
    ) -> ProgramResult:
        """As the step's user, like on a real host (when the agent runs as root)."""
        return await run_subprocess(argv, env, timeout, user=user, on_line=on_line)
