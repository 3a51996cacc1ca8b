"""Inventory (`fleet.toml`) and selectors.

    [hosts.web1]
    tags = ["web", "eu"]

    [groups]
    frontend = ["@web", "db1"]

    [rollout]           # defaults for `fleetctl deploy` (see controller.policy)
    batch = "10%"

A selector is a host name, `@tag`, or a group name; a comma makes a union. Names that
match nothing are an error that lists close matches.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import InputError, UnknownHostError
from protocol.topics import HOST_NAME_RE

GROUP_RE = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"
TAG_RE = HOST_NAME_RE  # tags follow the host-name rules: a-z, 0-9, '-'
HOST_KEYS = ("tags",)
ROLLOUT_KEYS = ("canary", "batch", "max_parallel", "max_failures", "min_executed",
                "host_timeout", "retries", "pause_between_batches", "confirm_batches",
                "offline")


def check_tag(tag: object, where: str) -> str:
    """A tag as the inventory and `hosts add` accept it; InputError naming `where`."""
    if not isinstance(tag, str):
        raise InputError(f"{where}: tags must be strings (quoted tag names), not {tag!r}")
    if not tag:
        raise InputError(f"{where}: empty tag (remove it)")
    if not TAG_RE.fullmatch(tag):
        raise InputError(f"{where}: invalid tag {tag!r}: tags are like host names "
                         "(a-z, 0-9, '-'; starting with a letter or digit)")
    return tag


def check_keys(keys: object, known: tuple[str, ...], where: str, what: str = "key") -> None:
    """Unknown keys are errors naming the key (and a close match), never ignored."""
    for key in keys if isinstance(keys, dict) else []:
        norm = str(key).replace("-", "_")
        if norm not in known:
            close = difflib.get_close_matches(norm, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f" (known: {', '.join(known)})"
            shown = key if str(key).isprintable() else repr(key)
            raise InputError(f"{where}: unknown {what} {shown!r}{hint}")
MAX_GROUP_DEPTH = 32


@dataclass(frozen=True)
class Inventory:
    hosts: dict[str, tuple[str, ...]]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> set[str]:
        return {t for tags in self.hosts.values() for t in tags}

    def resolve(self, selector: str) -> list[str]:
        """Hosts named by `selector`, in inventory order."""
        chosen = self._resolve(selector, ())
        return [h for h in self.hosts if h in chosen]

    def _resolve(self, selector: str, seen: tuple[str, ...]) -> set[str]:
        terms = [t.strip() for t in selector.split(",")]
        if not selector.strip() or any(not t for t in terms):
            raise InputError(f"empty selector term in {selector!r}")
        out: set[str] = set()
        for term in terms:
            if term.startswith("@"):
                tag = term[1:]
                if tag not in self.tags:
                    raise UnknownHostError(_unknown("tag", term, [f"@{t}" for t in self.tags]))
                out |= {h for h, tags in self.hosts.items() if tag in tags}
            elif term in self.groups:
                if term in seen:
                    raise InputError(f"group {term} includes itself ({' -> '.join(seen)})")
                if len(seen) >= MAX_GROUP_DEPTH:
                    raise InputError(f"groups nest deeper than {MAX_GROUP_DEPTH} levels "
                                     f"({' -> '.join(seen[:3])} -> ...)")
                for sub in self.groups[term]:
                    out |= self._resolve(sub, (*seen, term))
            elif term in self.hosts:
                out.add(term)
            else:
                names = [*self.hosts, *self.groups, *(f"@{t}" for t in self.tags)]
                raise UnknownHostError(_unknown("host or group", term, names))
        return out


def _unknown(kind: str, term: str, names: list[str]) -> str:
    close = difflib.get_close_matches(term, names, n=3, cutoff=0.6)
    shown = [c if c.isprintable() else repr(c) for c in close]
    hint = f"; did you mean {', '.join(shown)}?" if close else ""
    return f"unknown {kind} {term!r} in the inventory{hint}"


def parse_inventory(text: str, source: str = "inventory") -> Inventory:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise InputError(f"{source}: invalid TOML: nested too deeply") from None
    check_keys(data, ("hosts", "groups", "rollout"), source, "table")
    hosts_raw = data.get("hosts", {})
    if not isinstance(hosts_raw, dict):
        raise InputError(f"{source}: [hosts] must be a table of [hosts.NAME] tables")
    hosts: dict[str, tuple[str, ...]] = {}
    for name, spec in hosts_raw.items():
        if not HOST_NAME_RE.fullmatch(name):
            raise InputError(f"{source}: invalid host name {name!r} (use a-z, 0-9, '-')")
        if not isinstance(spec, dict):
            raise InputError(f"{source}: [hosts.{name}] must be a table")
        check_keys(spec, HOST_KEYS, f"{source}: [hosts.{name}]")
        tags = spec.get("tags", [])
        if not isinstance(tags, list):
            raise InputError(f"{source}: hosts.{name}.tags must be a list of tag names")
        hosts[name] = tuple(check_tag(t, f"{source}: hosts.{name}.tags") for t in tags)
    groups_raw = data.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise InputError(f"{source}: [groups] must map names to lists of selectors")
    groups: dict[str, tuple[str, ...]] = {}

    for name, members in groups_raw.items():
        if not re.fullmatch(GROUP_RE, name):
            raise InputError(f"{source}: invalid group name {name!r}")
        if name in hosts:
            raise InputError(f"{source}: group {name!r} has the name of a host")
        if not isinstance(members, list):
            raise InputError(f"{source}: groups.{name} must be a list of selectors")
        for m in members:
            if not isinstance(m, str):
                raise InputError(f"{source}: groups.{name}: selectors must be strings "
                                 f"(host, group or @tag names), not {m!r}")
        groups[name] = tuple(members)
    rollout = data.get("rollout", {})
    if not isinstance(rollout, dict):
        raise InputError(f"{source}: [rollout] must be a table")
    check_keys(rollout, ROLLOUT_KEYS, f"{source}: [rollout]")
    inv = Inventory(hosts=hosts, groups=groups, rollout=rollout)
    for name in groups:  # every group must resolve, so typos surface at load time
        try:
            inv.resolve(name)
        except InputError as exc:
            raise InputError(f"{source}: group {name}: {exc}") from None
    return inv


def load_inventory(path: Path) -> Inventory:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"inventory {path} not found (set --inventory or FLEET_INVENTORY)"
                         ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read inventory {path}: {exc}") from None
    return parse_inventory(text, str(path))


def render_inventory(hosts: dict[str, list[str]], groups: dict[str, list[str]]) -> str:
    """TOML text for an inventory (used by `demo` and `hosts add`)."""
    lines: list[str] = []
    for name, tags in hosts.items():
        lines += [f"[hosts.{name}]", f"tags = {_toml_list(tags)}", ""]
    if groups:
        lines.append("[groups]")
        lines += [f"{name} = {_toml_list(members)}" for name, members in groups.items()]
    return "\n".join(lines) + "\n"


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"
