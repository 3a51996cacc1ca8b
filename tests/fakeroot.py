"""A fake NixOS host for the nixos backend: a root dir, a store dir, fake commands on PATH.

`tests/fakenix/` holds the fake commands (one script, symlinked per name); this module
builds the directories they act on and reads back what they were asked to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FAKENIX = Path(__file__).resolve().parent / "fakenix"


def store_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


class FakeRoot:
    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.store = base / "store"
        self.store.mkdir(parents=True)
        # run/systemd/system: this fake host runs systemd (activation goes through
        # systemd-run, as on NixOS); remove it to be a container without systemd.
        for d in ("run/systemd/system", "nix/var/nix/profiles", "proc/sys/kernel/random",
                  "fakenix"):
            (self.root / d).mkdir(parents=True)
        self.new_boot_id()

    # -- building the host ------------------------------------------------------------
    def system(self, name: str, kernel: str = "6.6.1", initrd: str | None = None,
               stc_exit: int | None = None, inhibited: bool = False,
               agent_unit: str | None = None) -> str:
        """A fake system toplevel with bin/switch-to-configuration and boot files."""
        top = self.store / f"{store_hash(name)}-nixos-system-{name}"
        (top / "bin").mkdir(parents=True)
        (top / "bin/switch-to-configuration").symlink_to(FAKENIX / "switch-to-configuration")
        (top / "kernel").symlink_to(self.store_path(f"linux-{kernel}", "bzImage"))
        (top / "initrd").symlink_to(self.store_path(f"initrd-linux-{initrd or kernel}", "initrd"))
        (top / "kernel-modules").symlink_to(self.store_path(f"linux-{kernel}-modules", None))
        (top / "flotilla").mkdir()
        if stc_exit is not None:
            (top / "stc-exit").write_text(str(stc_exit))
        if inhibited:
            (top / "stc-inhibited").touch()
        if agent_unit is not None:  # the agent's unit file, a store path of its own
            (top / "etc/systemd/system").mkdir(parents=True)
            unit = self.store_path(f"unit-flotilla-agent-{agent_unit}", "flotilla-agent.service")
            unit.write_text(f"[Service]\nExecStart=/bin/fleet-agent {agent_unit}\n")
            (top / "etc/systemd/system/flotilla-agent.service").symlink_to(unit)
        return str(top)

    def store_path(self, name: str, file: str | None) -> Path:
        d = self.store / f"{store_hash(name)}-{name}"
        d.mkdir(exist_ok=True)
        if file is None:
            return d
        (d / file).touch()
        return d / file

    def install(self, system: str) -> None:
        """The host booted `system`, generation 1 of the profile."""
        self.profile.with_name("system-1-link").symlink_to(system)
        self.profile.symlink_to("system-1-link")
        (self.root / "run/current-system").symlink_to(system)
        (self.root / "run/booted-system").symlink_to(system)

    def boot(self) -> None:
        """Simulate a reboot: boot the profile's default, new boot id."""
        target = os.path.realpath(self.profile)
        for name in ("current-system", "booted-system"):
            link = self.root / "run" / name
            link.unlink()
            link.symlink_to(target)
        self.new_boot_id()

    def new_boot_id(self) -> str:
        boot_id = str(uuid.uuid4())
        (self.root / "proc/sys/kernel/random/boot_id").write_text(boot_id + "\n")
        return boot_id

    def fail(self, command: str, code: int) -> None:
        (self.root / "fakenix" / f"exit-{command}").write_text(str(code))

    def flake_outputs(self, outputs: dict[str, str]) -> None:
        (self.root / "fakenix/flake.json").write_text(json.dumps(outputs))

    # -- reading the host --------------------------------------------------------------
    @property
    def profile(self) -> Path:
        return self.root / "nix/var/nix/profiles/system"

    @property
    def profile_target(self) -> str:
        return os.path.realpath(self.profile)

    @property
    def current(self) -> str:
        return os.path.realpath(self.root / "run/current-system")

    def calls(self) -> list[list[str]]:
        log = self.root / "fakenix.log"
        if not log.exists():
            return []
        return [json.loads(line)["argv"] for line in log.read_text().splitlines()]

    def stc_env(self) -> list[str | None]:
        """NIXOS_INSTALL_BOOTLOADER as each switch-to-configuration run saw it."""
        log = self.root / "fakenix.log"
        entries = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        return [e.get("NIXOS_INSTALL_BOOTLOADER") for e in entries
                if e["argv"][0] == "switch-to-configuration"]

    def clear_calls(self) -> None:
        (self.root / "fakenix.log").unlink(missing_ok=True)

    def env(self) -> dict[str, str]:
        return {"PATH": f"{FAKENIX}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKENIX_ROOT": str(self.root), "NIX_STORE_DIR": str(self.store)}


def activation(toplevel: str, action: str) -> list[str]:
    """The exact systemd-run command line the backend must use (the issue's contract)."""
    return ["systemd-run", "-E", "LOCALE_ARCHIVE", "-E", "NIXOS_INSTALL_BOOTLOADER",
            "--collect", "--no-ask-password", "--pipe", "--quiet", "--service-type=exec",
            "--unit=flotilla-switch-to-configuration", "--wait",
            f"{toplevel}/bin/switch-to-configuration", action]
