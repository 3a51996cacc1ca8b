#!/usr/bin/env python3
"""Fake nix, nix-store, nix-env, systemd-run, systemctl and switch-to-configuration.

Each command name is a symlink to this script. Every call appends its argv as one
JSON line to $FAKENIX_ROOT/fakenix.log (argv[0] = command name; for
switch-to-configuration also the toplevel), prints output like the real command and
exits with a code the test chooses:

  $FAKENIX_ROOT/fakenix/exit-<command>   exit code of that command (default 0)
  $FAKENIX_ROOT/fakenix/flake.json       {"installable": "out path"} for `nix build`
  TOPLEVEL/stc-exit                      exit code of that system's switch-to-configuration
  TOPLEVEL/stc-inhibited                 its switch inhibitors refuse switch/test (exit 1)

nix-env really maintains the profile's `system-N-link` generations, systemd-run really
execs its command, and switch-to-configuration updates ROOT/run/current-system (switch,
test) like activation does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(os.environ.get("FAKENIX_ROOT", "/nonexistent-fakenix-root"))
CONTROL = ROOT / "fakenix"


def log(entry: dict[str, object]) -> None:
    with open(ROOT / "fakenix.log", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def chosen_exit(name: str) -> int | None:
    f = CONTROL / f"exit-{name}"
    return int(f.read_text().strip()) if f.exists() else None


def err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def relink(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".tmp")
    if os.path.lexists(tmp):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def generations(profile: Path) -> dict[int, Path]:
    pat = re.compile(rf"^{re.escape(profile.name)}-(\d+)-link$")
    return {int(m.group(1)): p for p in profile.parent.iterdir()
            if (m := pat.fullmatch(p.name))}


def current_generation(profile: Path) -> int | None:
    if not os.path.lexists(profile):
        return None
    m = re.search(r"-(\d+)-link$", os.readlink(profile))
    return int(m.group(1)) if m else None


def nix_env(args: list[str]) -> int:
    profile = Path(args[args.index("-p") + 1])
    gens = generations(profile)
    cur = current_generation(profile)
    if "--set" in args:
        target = args[args.index("--set") + 1]
        new = max(gens, default=0) + 1
        (profile.parent / f"{profile.name}-{new}-link").symlink_to(target)
        relink(profile, f"{profile.name}-{new}-link")
        return 0
    if "--rollback" in args:
        older = [g for g in gens if cur is not None and g < cur]
        if not older:
            err(f"error: no generation older than the current ({cur}) exists")
            return 1
        new = max(older)
    elif "--switch-generation" in args:
        new = int(args[args.index("--switch-generation") + 1])
        if new not in gens:
            err(f"error: generation {new} does not exist")
            return 1
    else:
        err("fakenix: unsupported nix-env call")
        return 2
    err(f"switching profile from version {cur} to {new}")
    relink(profile, f"{profile.name}-{new}-link")
    return 0


def nix_store(args: list[str]) -> int:
    path = args[args.index("--realise") + 1]
    if not Path(path).exists():
        err(f"error: path '{path}' is not valid")
        return 1
    err("these 2 paths will be fetched (1.50 MiB download, 7.25 MiB unpacked):",
        f"copying path '{path}' from 'https://cache.nixos.org'...")
    print(path, flush=True)
    return 0


def nix(args: list[str]) -> int:
    rest = list(args)
    while rest and rest[0] == "--extra-experimental-features":
        rest = rest[2:]
    if rest[:1] == ["copy"]:
        err(f"copying path '{rest[-1]}' from '{rest[rest.index('--from') + 1]}'...")
        return 0
    if rest[:1] == ["build"]:
        installable = rest[-1]
        table = CONTROL / "flake.json"
        outputs = json.loads(table.read_text()) if table.exists() else {}
        err(f"building '/nix/store/00000000000000000000000000000000-{installable[:20]}.drv'...")
        if installable not in outputs:
            ref, _, attr = installable.partition("#")
            err(f"error: flake '{ref}' does not provide attribute '{attr}'")
            return 1
        out = outputs[installable]
        if "--json" in rest:
            print(json.dumps([{"drvPath": out + ".drv", "outputs": {"out": out}}]), flush=True)
        else:
            print(out, flush=True)
        return 0
    err("fakenix: unsupported nix call")
    return 2


def systemd_run(args: list[str]) -> int:
    """Exec the command (looked up on PATH, like systemd-run), as --uid/--gid if given."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "--":
            i += 1
            break
        i += 2 if args[i] in ("-E", "-p", "--setenv", "--property") else 1
    command = args[i:]
    opts = dict(a[2:].split("=", 1) for a in args[:i] if a.startswith("--") and "=" in a)
    if "gid" in opts:
        os.setgroups([])
        os.setgid(int(opts["gid"]))
    if "uid" in opts:
        os.setuid(int(opts["uid"]))
    os.execvp(command[0], command)
    return 127  # not reached


def switch_to_configuration(argv0: str, args: list[str]) -> int:
    toplevel = Path(argv0).parent.parent
    action = args[0] if args else ""
    code_file = toplevel / "stc-exit"
    code = int(code_file.read_text().strip()) if code_file.exists() else 0
    if (toplevel / "stc-inhibited").exists() and action != "boot":
        err("Checking switch inhibitors...", "Found diff in switch inhibitors:",
            "The new configuration contains changes to packages that were",
            "listed as switch inhibitors.", "Pre-switch checks failed")
        return 1
    if action == "dry-activate":
        err("would restart the following units: nginx.service")
        return 0
    err("activating the configuration...", "setting up /etc...")
    if code == 4:
        err("warning: the following units failed: broken.service")
    if code not in (0, 4, 100):
        err("error: activation script failed")
        return code
    if action in ("switch", "test"):
        relink(ROOT / "run/current-system", str(toplevel))
    return code


def main() -> int:
    name = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    if name == "switch-to-configuration":
        log({"argv": [name, *args], "toplevel": str(Path(sys.argv[0]).parent.parent),
             "NIXOS_INSTALL_BOOTLOADER": os.environ.get("NIXOS_INSTALL_BOOTLOADER")})
    else:
        log({"argv": [name, *args]})
    forced = chosen_exit(name)
    if forced is not None and forced != 0:
        err(f"{name}: failing as the test asked (exit {forced})")
        return forced
    if name == "nix-env":
        return nix_env(args)
    if name == "nix-store":
        return nix_store(args)
    if name == "nix":
        return nix(args)
    if name == "systemd-run":
        return systemd_run(args)
    if name == "systemctl":
        return 0
    if name == "switch-to-configuration":
        return switch_to_configuration(sys.argv[0], args)
    err(f"fakenix: unknown command {name}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
