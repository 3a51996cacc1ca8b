"""NixOS backend: does exactly what nixos-rebuild does, with every path under a root.

`--root DIR` prefixes the host's fixed paths (`/run/booted-system`,
`/run/current-system`, `/nix/var/nix/profiles/system`, `/proc/.../boot_id`) so tests
run against a fake root; the commands (`nix`, `nix-store`, `nix-env`, `systemd-run`,
`systemctl`) are looked up on PATH. Symlink targets are resolved on the real file
system: the Nix store is never under the root.

What `Desired.system` means (decided here, used by `classify_system`):

- a *store path* is `$NIX_STORE_DIR/<32 base32 chars>-<name>` (store dir default
  `/nix/store`): fetched with `nix-store --realise PATH`, after
  `nix copy --from URL PATH`. The URL is the binary cache the signed Desired names
  (with the one key its closure must be signed by: `require-sigs` on, that key as the
  only `trusted-public-keys`), else the agent's `--from-cache`;
- anything else is a *flake ref* `REF` or `REF#NAME` (like `nixos-rebuild --flake`):
  built with `nix build --no-link --json
  REF#nixosConfigurations.NAME.config.system.build.toplevel`, NAME defaulting to the
  agent's host name (`--json`, not `--print-out-paths`, which Nix 2.8 lacks). Like
  nixos-rebuild, every `nix` call passes
  `--extra-experimental-features 'nix-command flakes'`, so hosts need not enable them.

Switch = `nix-env -p PROFILE --set PATH` (switch and boot only), then
switch-to-configuration in a transient unit (`systemd-run ... --wait`), so the
activation survives a restart of the agent itself; without `/run/systemd/system`
(containers, chroots) it runs directly, as nixos-rebuild-ng does. Its exit codes are
those of switch-to-configuration(-ng): 0 ok, 1 refused or failed before activating
(pre-switch checks such as switch inhibitors, boot loader), 2 the activation script
failed, 4 some units failed. There is no "reboot required" code (100 is nixops'
own convention, not switch-to-configuration's): a reboot is needed when the boot files
differ. `dry-activate` switches nothing and says what would be restarted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.host.backend import (
    BackendError,
    LineFn,
    ProgramResult,
    ProgressFn,
    SwitchOutcome,
    read_boot_id,
    run_subprocess,
)
from protocol.models import BinaryCache
from protocol.nixref import (
    NIX_FLAGS,
    build_command,
    copy_from_command,
    explain_fetch_failure,
    out_path_of_build,
    toplevel_installable,
)

log = logging.getLogger(__name__)

SWITCH_UNIT = "flotilla-switch-to-configuration"
BOOT_FILES = ("kernel", "initrd", "kernel-modules")
ACTIONS = ("switch", "boot", "test", "dry-activate")
PROFILE_ACTIONS = ("switch", "boot")
EXIT_REFUSED, EXIT_ACTIVATION_FAILED, EXIT_UNITS_FAILED = 1, 2, 4
INHIBITOR_MARKERS = ("switch inhibitors", "switchInhibitors")
STORE_NAME_RE = re.compile(r"^[0-9a-z]{32}-[A-Za-z0-9+._?=-]+$")
FLAKE_NAME_RE = re.compile(r"^[A-Za-z0-9_.'-]+$")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RECORD_NAME = "nixos-switch.json"
AGENT_UNIT = "flotilla-agent.service"
TAIL_LINES = 8
MAX_LINE = 1000


def default_store_dir() -> str:
    """The Nix store dir; Nix itself honours NIX_STORE_DIR, so do we."""
    return os.environ.get("NIX_STORE_DIR", "/nix/store").rstrip("/") or "/nix/store"


# -- pure decisions ---------------------------------------------------------------------

@dataclass(frozen=True)
class StorePath:
    path: str


@dataclass(frozen=True)
class FlakeRef:
    ref: str
    name: str

    @property
    def installable(self) -> str:
        return toplevel_installable(self.ref, self.name)


def classify_system(system: str, store_dir: str, host: str) -> StorePath | FlakeRef:
    """Store path or flake ref (see the module docstring); bad input → BackendError."""
    if not system or any(c.isspace() or ord(c) < 32 for c in system):
        raise BackendError(f"invalid system {system!r}: empty or contains whitespace")
    prefix = store_dir.rstrip("/") + "/"
    if system.startswith(prefix):
        name = system[len(prefix):].rstrip("/")
        if not STORE_NAME_RE.fullmatch(name):
            raise BackendError(f"invalid store path {system!r}: want {prefix}<hash>-<name>")
        return StorePath(prefix + name)
    if system.startswith("-"):
        raise BackendError(f"invalid flake ref {system!r}: must not start with '-'")
    ref, sep, name = system.partition("#")
    if sep and (not name or not FLAKE_NAME_RE.fullmatch(name)):
        raise BackendError(f"invalid flake ref {system!r}: want REF or REF#HOSTNAME")
    if not ref:
        raise BackendError(f"invalid flake ref {system!r}: nothing before '#'")
    return FlakeRef(ref, name or host)


def fetch_commands(target: StorePath | FlakeRef, from_cache: str | None,
                   cache: BinaryCache | None = None) -> list[list[str]]:
    """The commands that make `target` present, in order (a build prints its path as
    JSON). The cache named by the signed Desired wins over the agent's --from-cache."""
    if isinstance(target, FlakeRef):
        return [build_command(target.installable)]
    cmds = []
    if cache is not None:
        cmds.append(copy_from_command(cache, target.path))
    elif from_cache:
        cmds.append(["nix", *NIX_FLAGS, "copy", "--from", from_cache, target.path])
    cmds.append(["nix-store", "--realise", target.path])
    return cmds


def activation_command(toplevel: str, action: str, systemd: bool = True) -> list[str]:
    """switch-to-configuration in a transient unit, exactly as nixos-rebuild runs it;
    directly when the host does not run systemd (no /run/systemd/system)."""
    stc = [f"{toplevel}/bin/switch-to-configuration", action]
    if not systemd:
        return stc
    return ["systemd-run", "-E", "LOCALE_ARCHIVE", "-E", "NIXOS_INSTALL_BOOTLOADER",
            "--collect", "--no-ask-password", "--pipe", "--quiet", "--service-type=exec",
            f"--unit={SWITCH_UNIT}", "--wait", *stc]


def activation_env(install_bootloader: bool) -> dict[str, str]:
    """nixos-rebuild-ng always sets NIXOS_INSTALL_BOOTLOADER, to 1 or 0."""
    return {"NIXOS_INSTALL_BOOTLOADER": "1" if install_bootloader else "0"}


def switch_commands(profile: str, toplevel: str, action: str,
                    systemd: bool = True) -> list[list[str]]:
    """The profile is set only for switch and boot; test and dry-activate leave it."""
    if action not in ACTIONS:
        raise BackendError(f"unknown action {action!r}: want switch, boot, test or "
                           "dry-activate")
    cmds = [["nix-env", "-p", profile, "--set", toplevel]] if action in PROFILE_ACTIONS else []
    return [*cmds, activation_command(toplevel, action, systemd)]


def interpret_switch_exit(code: int, action: str, tail: Sequence[str]) -> SwitchOutcome:
    """Exit 4 (units failed) is a result with meaning, and so is a switch refused by
    switch inhibitors (exit 1 from the pre-switch check; `boot` is not checked, so it is
    the way out). Anything else non-zero is an error."""
    if code == 0:
        return SwitchOutcome()
    if code == EXIT_UNITS_FAILED:
        return SwitchOutcome(exit_code=code, units_failed=True)
    if code == EXIT_REFUSED and action != "boot" and any(
            m in line for line in tail for m in INHIBITOR_MARKERS):
        return SwitchOutcome(exit_code=code, inhibited=True)
    what = " (the activation script failed)" if code == EXIT_ACTIVATION_FAILED else ""
    raise BackendError(f"switch-to-configuration {action} failed (exit {code}){what}"
                       + summarize(tail))


@dataclass(frozen=True)
class SwitchRecord:
    """What the last switch did to the profile, so a rollback undoes exactly that."""

    toplevel: str
    action: str
    profile_before: str | None

    @property
    def profile_set(self) -> bool:
        return self.action in ("switch", "boot")


def profile_rollback_command(profile: str, record: SwitchRecord | None,
                             profile_target: str | None, previous: str,
                             generations: Mapping[int, str]) -> list[str] | None:
    """How to point the profile back at `previous`; None when it needs no change.

    A `test` deploy never touched the profile, so it is left alone. Otherwise the
    newest generation that links to `previous` is selected; when none does (the
    previous system was never in the profile), `--rollback` undoes our `--set`.
    """
    if profile_target == previous:
        return None
    if record is not None and not record.profile_set:
        return None
    matching = [n for n, target in generations.items() if target == previous]
    if matching:
        return ["nix-env", "-p", profile, "--switch-generation", str(max(matching))]
    return ["nix-env", "-p", profile, "--rollback"]


def boot_files_differ(booted: Mapping[str, str | None], new: Mapping[str, str | None]) -> bool:
    """A reboot is needed when kernel, initrd or modules resolve to different paths."""
    return any(booted.get(name) != new.get(name) for name in BOOT_FILES)


def summarize(tail: Sequence[str]) -> str:
    """': last | output | lines' on one line, or '' when there was no output."""
    lines = [ln.strip() for ln in tail if ln.strip()]
    if not lines:
        return ""
    text = " | ".join(lines[-4:])
    return ": " + (text if len(text) <= 400 else "…" + text[-399:])


def clean_line(raw: bytes) -> str:
    text = ANSI_RE.sub("", raw.decode(errors="replace")).rstrip("\r\n").replace("\r", " ")
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + "…"


# -- running commands -----------------------------------------------------------------

@dataclass
class Completed:
    code: int
    stdout: list[str]
    tail: list[str]


async def stream_command(argv: Sequence[str], progress: ProgressFn,
                         env: Mapping[str, str] | None = None) -> Completed:
    """Run argv, send each stdout/stderr line to `progress`; keep stdout and a tail."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 20,
            env={**os.environ, **env} if env else None)
    except FileNotFoundError:
        raise BackendError(f"{argv[0]} not found on PATH (is this a NixOS host?)") from None
    except OSError as exc:
        raise BackendError(f"cannot run {argv[0]}: {exc.strerror}") from None
    stdout: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    async def pump(stream: asyncio.StreamReader | None, keep: list[str] | None) -> None:
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit was dropped by the reader
                raw = b"(overlong output line dropped)\n"
            if not raw:
                return
            line = clean_line(raw)
            if keep is not None:
                keep.append(line)
            if line.strip():
                tail.append(line)
                await progress(line)

    try:
        await asyncio.gather(pump(proc.stdout, stdout), pump(proc.stderr, None))
        code = await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.terminate()
        raise
    return Completed(code, stdout, list(tail))


# -- the backend ------------------------------------------------------------------------

class NixosBackend:
    name = "nixos"

    def __init__(self, root: Path, state_dir: Path, from_cache: str | None = None,
                 store_dir: str | None = None,
                 reboot_command: Sequence[str] = ("systemctl", "reboot"),
                 reboot_grace_s: float = 600.0, agent_unit: str = AGENT_UNIT) -> None:
        self.root = Path(root)
        self.state_dir = Path(state_dir)
        self.from_cache = from_cache or None
        self.store_dir = store_dir or default_store_dir()
        self.reboot_command = list(reboot_command)
        self.reboot_grace_s = reboot_grace_s
        self.agent_unit = agent_unit
        self.booted = self.root / "run/booted-system"
        self.current = self.root / "run/current-system"
        self.profile = self.root / "nix/var/nix/profiles/system"
        self.boot_id_file = self.root / "proc/sys/kernel/random/boot_id"

    # -- host facts ------------------------------------------------------------------
    def current_system(self) -> str | None:
        return _resolve(self.current)

    def boot_id(self) -> str:
        if self.root != Path("/") and self.boot_id_file.exists():
            return read_boot_id(self.boot_id_file)
        return read_boot_id()

    def needs_reboot(self, toplevel: str) -> bool:
        if not os.path.lexists(self.booted):
            log.warning("%s does not exist: cannot tell whether a reboot is needed", self.booted)
            return False
        return boot_files_differ({n: _resolve(self.booted / n) for n in BOOT_FILES},
                                 {n: _resolve(Path(toplevel) / n) for n in BOOT_FILES})

    def generations(self) -> dict[int, str]:
        """Profile generations (`system-N-link`) and the system each links to."""
        pattern = re.compile(rf"^{re.escape(self.profile.name)}-(\d+)-link$")
        out: dict[int, str] = {}
        try:
            entries = list(self.profile.parent.iterdir())
        except OSError:
            return out
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            target = _resolve(entry) if m else None
            if m and target is not None:
                out[int(m.group(1))] = target
        return out

    # -- fetch -----------------------------------------------------------------------
    async def fetch(self, system: str, host: str, progress: ProgressFn,
                    cache: BinaryCache | None = None) -> str:
        target = classify_system(system, self.store_dir, host)
        done: Completed | None = None
        for argv in fetch_commands(target, self.from_cache, cache):
            done = await stream_command(argv, progress)
            if done.code != 0:
                refused = (explain_fetch_failure(target.path, cache, done.tail)
                           if cache is not None and isinstance(target, StorePath) else None)
                raise BackendError(refused or f"{_what(argv)} failed (exit {done.code})"
                                   + summarize(done.tail))
        if isinstance(target, StorePath):
            return target.path
        assert done is not None
        path = out_path_of_build("\n".join(done.stdout)) or ""
        if not isinstance(_store_or_none(path, self.store_dir), StorePath):
            raise BackendError(f"nix build of {target.installable} printed no store path"
                               + summarize(done.tail))
        return path

    # -- switch ----------------------------------------------------------------------
    @property
    def runs_systemd(self) -> bool:
        """Whether this host's PID 1 is systemd (nixos-rebuild-ng's `test -d`)."""
        return (self.root / "run/systemd/system").is_dir()

    @property
    def use_scope(self) -> bool:
        """Programs get a transient scope where systemd runs and systemd-run is there."""
        return self.runs_systemd and shutil.which("systemd-run") is not None

    async def switch(self, toplevel: str, action: str, progress: ProgressFn,
                     install_bootloader: bool = False) -> SwitchOutcome:
        cmds = switch_commands(str(self.profile), toplevel, action, self.runs_systemd)
        stc = Path(toplevel) / "bin/switch-to-configuration"
        if not os.access(stc, os.X_OK):
            raise BackendError(f"{toplevel} is not a NixOS system: no executable "
                               "bin/switch-to-configuration")
        profile_before = _resolve(self.profile)
        if action in PROFILE_ACTIONS:
            self._write_record(SwitchRecord(toplevel, action, profile_before))
        *profile_cmds, activate = cmds
        for argv in profile_cmds:
            await self._run_ok(argv, progress)
        done = await stream_command(activate, progress, activation_env(install_bootloader))
        outcome = interpret_switch_exit(done.code, action, done.tail)
        if outcome.inhibited and profile_cmds and profile_before is not None:
            # Refused before anything was activated: the boot default goes back too.
            cmd = profile_rollback_command(str(self.profile), self._read_record(),
                                           _resolve(self.profile), profile_before,
                                           self.generations())
            if cmd is not None:
                await self._run_ok(cmd, progress)
            self._clear_record()
        return outcome

    def agent_unit_changed(self, previous: str | None, toplevel: str) -> bool:
        """The agent's unit file (`etc/systemd/system/UNIT` of each system, a store path)
        differs: the module sets restartIfChanged = false, so the switch left the old
        agent running and the agent restarts itself once the deployment is recorded."""
        def unit(system: str | None) -> str | None:
            return _resolve(Path(system) / "etc/systemd/system" / self.agent_unit) \
                if system else None
        new = unit(toplevel)
        return new is not None and new != unit(previous)

    async def restart_agent(self) -> None:
        """Queue a restart of our own unit and return (`--no-block`): systemd stops this
        process after the job is queued, never during a switch (those run in their own
        transient unit and are finished by now)."""
        argv = ["systemctl", "--no-block", "restart", self.agent_unit]
        result = await run_subprocess(argv, {}, timeout=60)
        if result.exit_code != 0:
            tail = (result.stderr or result.stdout).decode(errors="replace").splitlines()
            raise BackendError(f"systemctl restart {self.agent_unit} failed "
                               f"(exit {result.exit_code})" + summarize(tail))

    async def rollback(self, previous: str | None, progress: ProgressFn) -> None:
        if previous is None:
            raise BackendError("no previous system is known: cannot roll back")
        stc = Path(previous) / "bin/switch-to-configuration"
        if not os.access(stc, os.X_OK):
            raise BackendError(f"previous system {previous} is gone (garbage collected?): "
                               "cannot roll back")
        cmd = profile_rollback_command(str(self.profile), self._read_record(),
                                       _resolve(self.profile), previous, self.generations())
        if cmd is not None:
            await self._run_ok(cmd, progress)
        done = await stream_command(activation_command(previous, "switch", self.runs_systemd),
                                    progress, activation_env(False))
        outcome = interpret_switch_exit(done.code, "switch", done.tail)
        if outcome.units_failed:
            await progress("rollback activated, but some units failed (exit 4)")
        self._clear_record()

    # -- reboot and programs ---------------------------------------------------------------
    async def reboot(self) -> None:
        """Ask for the reboot, then wait to be killed by it; still up later = failure."""
        result = await run_subprocess(self.reboot_command, {}, timeout=120)
        if result.exit_code != 0:
            tail = (result.stderr or result.stdout).decode(errors="replace").splitlines()
            raise BackendError(f"{' '.join(self.reboot_command)} failed "
                               f"(exit {result.exit_code})" + summarize(tail))
        await asyncio.sleep(self.reboot_grace_s)
        raise BackendError(f"asked for a reboot ({' '.join(self.reboot_command)}) but the "
                           f"host is still up after {self.reboot_grace_s:.0f}s")

    async def run_program(
        self, argv: Sequence[str], env: Mapping[str, str], user: str | None, timeout: float,
        on_line: LineFn | None = None,
    ) -> ProgramResult:
        """In its own systemd scope where systemd runs (every descendant is killed with
        it), else in its own session; see `run_subprocess`."""
        return await run_subprocess(argv, env, timeout, user=user, on_line=on_line,
                                    scope=self.use_scope)

    # -- helpers ---------------------------------------------------------------------------
    async def _run_ok(self, argv: Sequence[str], progress: ProgressFn) -> None:
        done = await stream_command(argv, progress)
        if done.code != 0:
            raise BackendError(f"{_what(argv)} failed (exit {done.code})" + summarize(done.tail))

    @property
    def _record_path(self) -> Path:
        return self.state_dir / RECORD_NAME

    def _write_record(self, record: SwitchRecord) -> None:
        data = json.dumps({"toplevel": record.toplevel, "action": record.action,
                           "profile_before": record.profile_before}).encode()
        tmp = self._record_path.with_suffix(".tmp")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._record_path)
        except OSError as exc:
            raise BackendError(f"cannot write {self._record_path}: {exc.strerror}") from None

    def _read_record(self) -> SwitchRecord | None:
        try:
            raw = json.loads(self._record_path.read_text())
            return SwitchRecord(str(raw["toplevel"]), str(raw["action"]),
                                raw.get("profile_before"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _clear_record(self) -> None:
        try:
            self._record_path.unlink(missing_ok=True)
        except OSError:
            pass


def _resolve(path: Path) -> str | None:
    """The final target of a symlink chain, or None when nothing is there."""
    return os.path.realpath(path) if os.path.lexists(path) else None


def _store_or_none(path: str, store_dir: str) -> StorePath | None:
    try:
        target = classify_system(path, store_dir, "x")
    except BackendError:
        return None
    return target if isinstance(target, StorePath) else None


def _what(argv: Sequence[str]) -> str:
    """A short name of a command for error messages: `nix build`, `nix-env --set`."""
    if argv[0] == "nix":
        return " ".join(["nix", *(a for a in argv[1:] if a in ("build", "copy"))][:2])
    return " ".join([argv[0], *(a for a in argv[1:] if a.startswith("--"))][:2])
