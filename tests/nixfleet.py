"""A fleet flake built with the REAL Nix (Debian's nix-bin), and agents that fetch it.

The flake has no inputs (no nixpkgs): each `nixosConfigurations.<host>` has a
`config.system.build.toplevel` shaped like a NixOS toplevel (`bin/switch-to-configuration`
that records its arguments and moves the fake root's `run/current-system`, `kernel`,
`initrd`, `kernel-modules` from a kernel derivation, `flotilla/steps.json`,
`nixos-version`) and `config.services.flotilla-agent.tags`. The builders use /bin/sh
with PATH=/usr/bin:/bin (the store is single-user here, sandbox off).

Every flake carries a fresh nonce in its derivation names and contents, so tests (and
other checkouts running the suite at the same time on this machine) never share a store
path: deleting "our" paths can never pull one from under another test.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakeroot import FAKENIX, FakeRoot

NIX_FLAGS = ["--extra-experimental-features", "nix-command flakes"]
# Offline, single-user: the default cache is unreachable, builds run unsandboxed.
NIX_CONFIG = "substituters =\nsandbox = false\n"

STC = """#!/bin/sh
# switch-to-configuration of a Flotilla test system (nonce @nonce@)
top=$(dirname "$(dirname "$0")")
echo "$1 NIXOS_INSTALL_BOOTLOADER=${NIXOS_INSTALL_BOOTLOADER-unset} $top" >> "$FAKENIX_ROOT/stc.log"
echo "activating the configuration..." >&2
case "$1" in
  switch|test) ln -sfn "$top" "$FAKENIX_ROOT/run/current-system" ;;
  dry-activate) echo "would restart the following units: nginx.service" >&2 ;;
esac
exit 0
"""

FLAKE = """{
  outputs = { self }:
    let
      nonce = "@nonce@";
      system = "@system@";
      sh = "/bin/sh";
      stc = builtins.toFile "switch-to-configuration-${nonce}" (builtins.readFile ./stc.sh);
      # One kernel per host: Nix 2.8 fails ("not an absolute path: 'nix-archive-1'") when
      # several processes copy the same path into one single-user store at once, which
      # only happens here, where every "host" shares this machine's store.
      kernel = name: derivation {
        name = "linux-6.6.1-${name}-${nonce}";
        inherit system;
        builder = sh;
        PATH = "/usr/bin:/bin";
        args = [ "-c" "mkdir -p $out/lib/modules/6.6.1 && echo ${nonce} > $out/bzImage && echo ${nonce} > $out/initrd" ];
      };
      host = name: { tags, fail ? false }: {
        config.services.flotilla-agent.tags = tags;
        config.system.build.toplevel = derivation {
          name = "nixos-system-${name}-${nonce}";
          inherit system;
          builder = sh;
          PATH = "/usr/bin:/bin";
          args = [ "-c" (if fail then ''
            echo "compiling ${name}"
            echo "error: ${name} does not build (on purpose)" >&2
            exit 1
          '' else ''
            set -e
            mkdir -p $out/bin $out/flotilla
            cp ${stc} $out/bin/switch-to-configuration
            chmod +x $out/bin/switch-to-configuration
            ln -s ${kernel name}/bzImage $out/kernel
            ln -s ${kernel name}/initrd $out/initrd
            ln -s ${kernel name}/lib $out/kernel-modules
            echo '{"steps": []}' > $out/flotilla/steps.json
            echo "25.11-${name}-${nonce}" > $out/nixos-version
          '') ];
        };
      };
    in {
      nixosConfigurations = {
@hosts@
      };
    };
}
"""


def nix_system() -> str:
    machine = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64",
               "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    return f"{machine}-linux"


def require_real_nix() -> None:
    """Fail (never skip) without a Nix that can build into /nix/store as this user."""
    missing = [c for c in ("nix", "nix-store", "nix-env") if shutil.which(c) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Nix with 'sudo apt-get install "
                    "nix-bin' (make test does this)")
    if not os.access("/nix/store", os.W_OK) or not os.access("/nix/var/nix/db", os.W_OK):
        pytest.fail("these tests build into a single-user /nix/store and need to write it: "
                    "run them as root (or the store's owner) with NIX_REMOTE unset; a store "
                    "never used yet is made with 'NIX_REMOTE= nix-store --init' (make test "
                    "does this)")


def nix(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["nix", *NIX_FLAGS, *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"nix {' '.join(args)}: {r.stderr}"
    return r


@dataclass
class FleetFlake:
    dir: Path
    nonce: str
    hosts: dict[str, list[str]]

    @property
    def ref(self) -> str:
        return f"path:{self.dir}"

    def closure(self, paths: list[str]) -> list[str]:
        r = subprocess.run(["nix-store", "--query", "--requisites", *paths],
                           capture_output=True, text=True, timeout=60, check=True)
        return r.stdout.split()

    def delete_from_store(self, paths: list[str]) -> None:
        """Remove these closures from the local store (they must come back from a cache)."""
        closure = self.closure(paths)
        assert all(self.nonce in p for p in closure), closure  # only ever our own paths
        r = subprocess.run(["nix-store", "--delete", *closure], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not any(Path(p).exists() for p in closure)


def write_fleet_flake(base: Path, hosts: dict[str, list[str]],
                      failing: tuple[str, ...] = ()) -> FleetFlake:
    nonce = uuid.uuid4().hex[:12]
    d = base / "fleet-flake"
    d.mkdir(parents=True)
    entries = "\n".join(
        f'        {h} = host "{h}" {{ tags = [ {" ".join(json.dumps(t) for t in tags)} ];'
        f'{" fail = true;" if h in failing else ""} }};'
        for h, tags in hosts.items())
    (d / "flake.nix").write_text(FLAKE.replace("@nonce@", nonce).replace(
        "@system@", nix_system()).replace("@hosts@", entries))
    (d / "stc.sh").write_text(STC.replace("@nonce@", nonce))
    return FleetFlake(d, nonce, hosts)


def cache_key(base: Path, name: str = "flotilla-test-1") -> tuple[Path, str]:
    """A Nix binary-cache signing key (secret file, public key text)."""
    secret, public = base / f"{name}.sec", base / f"{name}.pub"
    subprocess.run(["nix-store", "--generate-binary-cache-key", name, str(secret),
                    str(public)], check=True, capture_output=True, timeout=30)
    return secret, public.read_text().strip()


class NixHost:
    """A fake NixOS root for one agent whose nix, nix-store and nix-env are the real ones;
    `systemd-run` (there is no systemd here) is the only stand-in on PATH."""

    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.fake = FakeRoot(base / f"host-{name}")
        self.old = self.fake.system(f"old-{name}")
        self.fake.install(self.old)
        self.bin = base / f"host-{name}" / "standins"
        self.bin.mkdir()
        (self.bin / "systemd-run").symlink_to(FAKENIX / "systemd-run")

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKENIX_ROOT": str(self.fake.root)}

    @property
    def stc_log(self) -> list[str]:
        f = self.fake.root / "stc.log"
        return f.read_text().splitlines() if f.exists() else []

    @property
    def current(self) -> str:
        return self.fake.current
