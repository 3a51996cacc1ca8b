"""Issue 14: what the operator sees: honest progress, dry runs, listings, help, the demo."""

from __future__ import annotations

import json
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import Fleet
from tests.stepsys import make_db, make_system


def popen_lines(fleet: Fleet, *args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "controller", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fleet.env())
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def next_line(lines: queue.Queue[str], pred, seen: list[str], timeout: float = 40) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if pred(line):
            return line
    raise AssertionError(f"no such line in {timeout}s; saw {seen[-10:]}")


def test_piped_deploy_prints_host_changes_and_the_command_that_answers(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet({"pg1": ["db"]})
    db = tmp_path / "db"
    make_db(db)
    top = make_system(tmp_path / "systems", "sys-a", db, tmp_path / "runs.log", sleep=0.05)
    fleet.start_simulated(["pg1"])
    proc, lines = popen_lines(fleet, "deploy", "pg1", "--system", str(top), "--timeout", "60")
    seen: list[str] = []
    try:
        # Not a terminal: timestamped lines while it runs, not only a summary at the end.
        first = next_line(lines, lambda ln: " pg1 " in ln, seen)
        assert first[2] == ":" and first[5] == ":", first  # HH:MM:SS
        hint = next_line(lines, lambda ln: "fleetctl answer" in ln, seen)
        assert any("pg1 awaiting choice" in ln for ln in seen), seen
        cmd = hint[hint.index("fleetctl answer"):hint.index(" (fleetctl prompts")]
        argv = shlex.split(cmd)[1:]
        assert argv[:2] == ["answer", "pg1"] and argv[3] == "db.major=upgrade|dump-restore"
        argv[3] = "db.major=upgrade"
        r = fleet.fleetctl(*argv)
        assert r.returncode == 0, r.stdout + r.stderr
        next_line(lines, lambda ln: "pg1 succeeded" in ln, seen)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_deploy_json_stream_has_watch_lines_then_the_summary(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"w1": ["web"], "w2": ["web"]})
    fleet.start_simulated(["w1", "w2"])
    r = fleet.fleetctl("deploy", "@web", "--system", "/nix/store/x-sys", "--json", "--stream")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    hosts = [x for x in rows[:-1] if x["type"] == "host"]
    assert {x["host"] for x in hosts if x["result"] == "succeeded"} == {"w1", "w2"}
    assert set(hosts[0]) >= {"rollout", "host", "phase", "result", "message", "elapsed"}
    assert rows[-1]["status"] == "succeeded" and rows[-1]["hosts"] == {"w1": "succeeded",
                                                                       "w2": "succeeded"}
    # without --stream, --json stays one summary line
    r = fleet.fleetctl("deploy", "@web", "--system", "/nix/store/y-sys", "--json")
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 1

