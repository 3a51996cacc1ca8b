"""Build a system toplevel with real state-step programs (shell scripts) for tests.

The "database" is a directory on disk; every program appends `STEP EVENT TIME` lines
to a run log, so tests can assert order, parallelism and how often each step ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/bash\nset -u\n" + body)
    path.chmod(0o755)
    return str(path)


def make_system(root: Path, name: str, db: Path, runlog: Path, *, major_item: bool = True,
                fail_step: str | None = None, sleep: float = 0.3, idempotent: tuple[str, ...] = (),
                broken_checks: bool = False, error_item: bool = False,
                only_db: bool = False) -> Path:
    """A toplevel with steps: db -> app (chain) and cache -> search (parallel branch)."""
    top = root / name
    bin_ = top / "bin"
    bin_.mkdir(parents=True)
    (top / "flotilla").mkdir()

    def log(step: str, what: str) -> str:
        return f'echo "{step} {what} $(date +%s.%N) ${{FLOTILLA_CHOICE:-}}" >> {runlog}\n'

    def migration(step: str, action: str, choice: str = "any") -> str:
        fail = 'echo "boom: disk on fire" >&2; exit 3\n' if step == fail_step else ""
        return script(bin_ / f"migrate-{step}-{choice}", log(step, "start") + f"sleep {sleep}\n"
                      + action + fail + log(step, "end"))

    items: list[dict[str, Any]] = []
    if major_item:
        items.append({"id": "major", "severity": "warning",
                      "message": "data directory is version 15, the new package is 16",
                      "choices": [
                          {"id": "upgrade", "label": "pg_upgrade", "description": "in place",
                           "destructive": False},
                          {"id": "dump-restore", "label": "dump and restore",
                           "description": "slower, safer", "destructive": True}],
                      "default": "upgrade"})
    if error_item:
        items.append({"id": "uid", "severity": "error", "choices": [], "default": None,
                      "message": "uid of postgres differs from /etc/passwd"})
    items.append({"id": "note", "severity": "recommendation", "choices": [], "default": None,
                  "message": "consider vacuuming first"})
    check_db = script(bin_ / "check-db", f"echo '{json.dumps({'items': items})}'\n")
    steps: list[dict[str, Any]] = [
        {"name": "db", "check": check_db, "paths": [str(db)], "revision": "16",
         "idempotent": "db" in idempotent,
         "migrations": {
             "upgrade": migration("db", f'echo "upgraded-$FLOTILLA_CHOICE" >> {db}/data\n',
                                  "upgrade"),
             "dump-restore": migration("db", f'echo "restored-$FLOTILLA_CHOICE" >> {db}/data\n',
                                       "dump-restore"),
         }},
        {"name": "app", "after": ["db"], "idempotent": "app" in idempotent,
         "migrations": {"*": migration("app", f'echo app >> {db}/data\n')}},
        {"name": "cache", "idempotent": "cache" in idempotent,
         "migrations": {"*": migration("cache", "")}},
        {"name": "search", "after": ["cache"], "idempotent": "search" in idempotent,
         "migrations": {"*": migration("search", "")}},
    ]
    if only_db:  # the phase's only migrations are db's per-choice ones (no "*")
        steps = steps[:1]
    if broken_checks:
        steps += [
            {"name": "crashes", "check": script(bin_ / "check-crash",
                                                "echo 'Segmentation fault' >&2; exit 139\n")},
            {"name": "garbage", "check": script(bin_ / "check-garbage", "echo 'not json {'\n")},
            {"name": "wrongshape", "check": script(bin_ / "check-shape",
                                                   'echo \'{"items": [{"id": 1}]}\'\n')},
            {"name": "missing", "check": str(bin_ / "does-not-exist")},
        ]
    (top / "flotilla" / "steps.json").write_text(json.dumps({"steps": steps}, indent=1))
    return top


def runs(runlog: Path) -> list[tuple[str, str, float, str]]:
    if not runlog.exists():
        return []
    out = []
    for line in runlog.read_text().splitlines():
        parts = line.split(" ")
        out.append((parts[0], parts[1], float(parts[2]), parts[3] if len(parts) > 3 else ""))
    return out


def make_db(db: Path) -> bytes:
    db.mkdir(parents=True, exist_ok=True)
    data = os.urandom(2048) + b"\nversion 15\n"
    (db / "data").write_bytes(data)
    (db / "sub").mkdir(exist_ok=True)
    (db / "sub" / "table").write_bytes(b"rows\n" * 100)
    return data


def asking_system(tmp: Path) -> Path:
    """A system (under `tmp`) whose db step asks db.major=upgrade|dump-restore, so that a
    deploy of it waits for an answer; its database and run log live beside it."""
    db = tmp / "db"
    make_db(db)
    return make_system(tmp / "systems", "sys-a", db, tmp / "runs.log", sleep=0.05)
