"""Reboots through the simulated backend: journaled, finished after the 'boot'."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import wait_for


def test_reboot_now_is_journaled_and_the_deploy_finishes_after_boot(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"rb1": ["x"]})
    top = tmp_path / "sys-new-kernel"
    top.mkdir()
    (top / "sim-needs-reboot").write_text("kernel differs\n")
    agent = fleet.start_agent("rb1")
    proc = subprocess.Popen([sys.executable, "-m", "controller", "deploy", "rb1", "--system",
                             str(top), "--reboot", "now", "--json", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=fleet.env())

    def rebooting() -> bool:
        if not (fleet.state_dir("rb1") / "journal.jsonl").exists():
            return False
        return any(r["kind"] == "note" and r.get("key") == "reboot_boot_id"
                   for r in fleet.journal("rb1"))
    wait_for(rebooting, timeout=30, what="the journaled reboot")
    boot_before = (fleet.state_dir("rb1") / "sim" / "boot-id").read_text()
    agent.send_signal(signal.SIGKILL)  # the machine goes down
    agent.wait()
    fleet.start_agent("rb1")           # ...and boots with a new boot id
    out, err = proc.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0, (result, err)
    assert result["hosts"] == {"rb1": "succeeded"}
    journal = fleet.journal("rb1")
    reboot_end = [r for r in journal if r["kind"] == "end" and r.get("stage") == "reboot"]
    assert reboot_end and reboot_end[0]["data"]["rebooted"] is True
    assert any(r["kind"] == "end" and r.get("stage") == "confirm" for r in journal)
    assert sum(1 for r in journal if r["kind"] == "begin" and r.get("stage") == "switch") == 1
    boot_ids = [r["boot_id"] for r in journal if r["kind"] == "start"]
    assert boot_ids[0] != boot_ids[-1] and boot_ids[-1] == boot_before
    _, rows = fleet.fleetctl_json("status", "rb1")
    assert rows[0]["needs_reboot"] is False and rows[0]["system"] == str(top)


def test_reboot_never_reports_needs_reboot(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"rb2": ["x"]})
    top = tmp_path / "sys-new-kernel"
    top.mkdir()
    (top / "sim-needs-reboot").write_text("kernel differs\n")
    fleet.start_agent("rb2")
    rc, out = fleet.fleetctl_json("deploy", "rb2", "--system", str(top))
    assert rc == 0, out
    _, rows = fleet.fleetctl_json("status", "rb2")
    assert rows[0]["needs_reboot"] is True
