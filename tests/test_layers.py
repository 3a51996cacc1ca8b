"""The package layout's rules, read from the source: who may import whom.

- `client` (the agent) and `controller` (`fleetctl`) never import each other; both
  import `protocol`, which imports neither.
- `fleetctl`'s command modules never import each other, only what they share
  (`cliutil`, `drive`, `demo_fleet`).
- The pure decision modules import no I/O: no MQTT, no subprocess, no sockets, no
  event loop. Their tests are tables because nothing else can happen in them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BY_COMMANDS = {"controller.commands.cliutil", "controller.commands.drive",
                      "controller.commands.demo_fleet"}
PURE = ["client.receive.decide", "client.run.machine", "client.run.reboot", "client.steps.plan",
        "client.ask.deadline", "controller.rollout.planner", "controller.rollout.prediction",
        "controller.rollout.reconcile", "controller.state.shape", "protocol.outcomes"]
IO_MODULES = {"asyncio", "subprocess", "socket", "aiomqtt", "paho", "aiohttp", "shutil",
              "threading", "multiprocessing"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("client", {"controller"}), ("controller", {"client"}), ("protocol", {"client", "controller"}),
])
def test_sides_never_import_each_other(package: str, forbidden: set[str]) -> None:
    files = sources(package)
    assert len(files) > 5
    bad = {f"{module_name(p)} imports {m}" for p in files for m in imports(p)
           if top(m) in forbidden}
    assert not bad


def test_command_modules_never_import_each_other() -> None:
    commands = {module_name(p) for p in sources("controller/commands")} - {"controller.commands"}
    assert "controller.commands.deploy" in commands
    bad = set()
    for p in sources("controller/commands"):
        me = module_name(p)
        for m in imports(p):
            if m in commands and m != me and m not in SHARED_BY_COMMANDS:
                bad.add(f"{me} imports {m}")
    assert not bad


@pytest.mark.parametrize("module", PURE)
def test_decisions_do_no_io(module: str) -> None:
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    io = {m for m in imports(path) if top(m) in IO_MODULES}
    assert not io, f"{module} imports {sorted(io)}"

