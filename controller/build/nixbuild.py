"""Per-host builds on the controller, the binary cache, and `deploy.json`.

`fleetctl build` (and `fleetctl deploy --flake`) evaluate and build
`REF#nixosConfigurations.<host>.config.system.build.toplevel` for every selected host,
up to `max_jobs` at once (a failure is recorded for that host, with the last lines of
its log, while the others go on), then sign the closures (`nix store sign -k KEY -r`)
and push them (`nix copy --to URL`; anything `nix copy` takes: file://, ssh-ng://,
s3://). The result is written in Cachix Deploy's shape,

    {"agents": {"web1": "/nix/store/…-nixos-system-web1", …},
     "cache": "file:///srv/cache", "cache_public_key": "name:base64"}

(`cache` and `cache_public_key` are ours and optional), which `fleetctl deploy
--systems deploy.json` reads back. The inventory can come from the flake itself:
`nixosConfigurations` names are the hosts and `services.flotilla-agent.tags` their tags.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from controller.state.inventory import Inventory
from protocol.errors import InputError
from protocol.models import BinaryCache
from protocol.nixref import (
    NIX_FLAGS,
    build_command,
    out_path_of_build,
    public_key_of_secret,
    toplevel_installable,
)
from protocol.topics import HOST_NAME_RE

TAIL_LINES = 10
TAGS_EXPR = ("cs: builtins.mapAttrs (_: c: c.config.services.flotilla-agent.tags or [ ]) cs")


# -- running nix --------------------------------------------------------------------------

@dataclass
class Ran:
    code: int
    stdout: str
    tail: list[str]


async def run_nix(argv: Sequence[str], on_line: Callable[[str], None] | None = None) -> Ran:
    """Run a nix command: stdout kept, stderr lines streamed to `on_line` (and the last
    few kept). A missing `nix` is an InputError naming the package."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 20)
    except FileNotFoundError:
        raise InputError(f"{argv[0]} not found: install Nix (Debian: apt-get install "
                         "nix-bin)") from None
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    async def errors() -> None:
        assert proc.stderr is not None
        while raw := await proc.stderr.readline():
            line = raw.decode(errors="replace").rstrip()
            if line.strip():
                tail.append(line)
                if on_line is not None:
                    on_line(line)

    assert proc.stdout is not None
    out, _ = await asyncio.gather(proc.stdout.read(), errors())
    code = await proc.wait()
    return Ran(code, out.decode(errors="replace"), list(tail))


# -- builds ---------------------------------------------------------------------------

@dataclass
class HostBuild:
    host: str
    status: str = "queued"  # queued, building, built, failed
    path: str | None = None
    last_line: str = ""
    tail: list[str] = field(default_factory=list)
    seconds: float | None = None

    @property
    def message(self) -> str:
        if self.status != "failed":
            return self.path or self.last_line
        return " | ".join(self.tail[-4:]) or "build failed"


@dataclass
class BuildRun:
    """Everything one `fleetctl build` learnt: per host, the cache, the timings."""

    ref: str
    hosts: dict[str, HostBuild]
    cache: BinaryCache | None = None
    push_status: str = "none"  # none, pushing, pushed, failed
    push_message: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def systems(self) -> dict[str, str]:
        return {h: b.path for h, b in self.hosts.items() if b.path and b.status == "built"}

    @property
    def failed(self) -> dict[str, str]:
        return {h: b.message for h, b in self.hosts.items() if b.status == "failed"}

    @property
    def ok(self) -> bool:
        return not self.failed and self.push_status in ("none", "pushed")

    def deploy_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"agents": self.systems}
        if self.cache is not None:
            doc["cache"] = self.cache.url
            doc["cache_public_key"] = self.cache.public_key
        return doc

    def summary(self) -> dict[str, Any]:
        return {**self.deploy_json(), "failed": self.failed,
                "push": self.push_status, "push_message": self.push_message,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


async def build_host(ref: str, b: HostBuild, on_change: Callable[[HostBuild], None]) -> None:
    b.status, started = "building", time.monotonic()
    on_change(b)

    def line(text: str) -> None:
        b.last_line = text
        on_change(b)

    ran = await run_nix(build_command(toplevel_installable(ref, b.host), "-L"), line)
    b.seconds, b.tail = time.monotonic() - started, ran.tail
    path = out_path_of_build(ran.stdout) if ran.code == 0 else None
    if path is None:
        b.status = "failed"
        if ran.code == 0:
            b.tail = [*b.tail, "nix build printed no output path"]
    else:
        b.status, b.path = "built", path
    on_change(b)


async def build_fleet(ref: str, hosts: Sequence[str], max_jobs: int,
                      on_change: Callable[[HostBuild], None] = lambda b: None,
                      on_start: Callable[[BuildRun], None] = lambda r: None) -> BuildRun:
    """Build every host's toplevel, `max_jobs` at once; failures do not stop the rest."""
    run = BuildRun(ref, {h: HostBuild(h) for h in hosts})
    on_start(run)
    sem = asyncio.Semaphore(max(1, max_jobs))

    async def one(b: HostBuild) -> None:
        async with sem:
            await build_host(ref, b, on_change)

    started = time.monotonic()
    await asyncio.gather(*(one(b) for b in run.hosts.values()))
    run.timings["build_s"] = time.monotonic() - started
    return run


def load_cache(url: str, sign_key: Path) -> tuple[BinaryCache, Path]:
    """The cache and its public key (derived from the signing key); bad input → InputError."""
    try:
        text = sign_key.read_text()
    except OSError as exc:
        raise InputError(f"cannot read signing key {sign_key}: {exc.strerror}") from None
    public = public_key_of_secret(text, str(sign_key))
    try:
        return BinaryCache(url=url, public_key=public), sign_key
    except ValidationError:
        raise InputError(f"--cache {url!r} is not a store URL (want e.g. file:///srv/cache, "
                         "ssh-ng://host, s3://bucket)") from None


def push_commands(paths: Sequence[str], cache: BinaryCache, sign_key: Path) -> list[list[str]]:
    """Sign every closure with the key, then copy the closures to the cache."""
    return [["nix", *NIX_FLAGS, "store", "sign", "--key-file", str(sign_key), "--recursive",
             *paths],
            ["nix", *NIX_FLAGS, "copy", "--to", cache.url, *paths]]


async def push(run: BuildRun, cache: BinaryCache, sign_key: Path,
               on_line: Callable[[str], None] = lambda s: None) -> None:
    run.cache = cache
    paths = sorted(set(run.systems.values()))
    if not paths:
        return
    run.push_status, started = "pushing", time.monotonic()
    for argv in push_commands(paths, cache, sign_key):
        ran = await run_nix(argv, on_line)
        if ran.code != 0:
            run.push_status = "failed"
            run.push_message = (f"nix {argv[len(NIX_FLAGS) + 1]} failed (exit {ran.code}): "
                                + " | ".join(ran.tail[-4:]))
            break
    else:
        run.push_status = "pushed"
    run.timings["push_s"] = time.monotonic() - started


# -- deploy.json ------------------------------------------------------------------------

@dataclass(frozen=True)
class SystemsFile:
    agents: dict[str, str]
    cache: BinaryCache | None = None

    def for_hosts(self, hosts: Sequence[str], source: str) -> dict[str, str]:
        """Each selected host's path; a selected host missing from the file is an error
        (hosts in the file but not selected are ignored)."""
        missing = [h for h in hosts if h not in self.agents]
        if missing:
            raise InputError(f"{source} has no system for {', '.join(missing)} "
                             f"(it lists {', '.join(sorted(self.agents)) or 'no host'})")
        return {h: self.agents[h] for h in hosts}


def parse_systems(text: str, source: str) -> SystemsFile:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{source}: not JSON: {exc}") from None
    agents = doc.get("agents") if isinstance(doc, dict) else None
    if not isinstance(agents, dict) or not all(
            isinstance(h, str) and isinstance(p, str) and p for h, p in agents.items()):
        raise InputError(f'{source}: want {{"agents": {{"HOST": "/nix/store/…", …}}}}')
    bad = [h for h in agents if not HOST_NAME_RE.fullmatch(h)]
    if bad:
        raise InputError(f"{source}: invalid host name {bad[0]!r}")
    url, key = doc.get("cache"), doc.get("cache_public_key")
    cache = None
    if url is not None or key is not None:
        try:
            cache = BinaryCache(url=url, public_key=key)
        except ValidationError:
            raise InputError(f'{source}: "cache" needs "cache_public_key" (NAME:BASE64) and '
                             "a store URL") from None
    return SystemsFile(dict(agents), cache)


def load_systems(path: Path) -> SystemsFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return parse_systems(text, str(path))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


# -- the inventory from the flake ----------------------------------------------------------

def flake_inventory(ref: str) -> Inventory:
    """Hosts = `nixosConfigurations` names, tags = their `services.flotilla-agent.tags`."""
    argv = ["nix", *NIX_FLAGS, "eval", "--json", f"{ref}#nixosConfigurations",
            "--apply", TAGS_EXPR]
    try:
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise InputError("nix not found: install Nix (Debian: apt-get install nix-bin)"
                         ) from None
    except subprocess.TimeoutExpired:
        raise InputError(f"evaluating the hosts of {ref} took over 600 s") from None
    if ran.returncode != 0:
        tail = [ln for ln in ran.stderr.splitlines() if ln.strip()][-3:]
        raise InputError(f"cannot read hosts from the flake {ref}: "
                         + (" | ".join(tail) or f"nix eval exit {ran.returncode}"))
    try:
        data = json.loads(ran.stdout)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise InputError(f"{ref}#nixosConfigurations did not evaluate to an attribute set")
    hosts: dict[str, tuple[str, ...]] = {}
    for name, tags in data.items():
        if not HOST_NAME_RE.fullmatch(name):
            raise InputError(f"{ref}: nixosConfigurations.{name} is not a valid fleet host "
                             "name (1-63 of a-z 0-9 -)")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t and "," not in t
                                                  for t in tags):
            raise InputError(f"{ref}: {name}'s services.flotilla-agent.tags is not a list "
                             "of tag names")
        hosts[name] = tuple(tags)
    return Inventory(hosts=hosts)
