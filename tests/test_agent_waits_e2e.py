"""Issue 10's agent symptoms end to end (real broker, real agent processes): answers while
a prompt is open, waits that can be ended, "not now", stable prompts across restarts,
rolling back a first deployment, and how the agent picks its backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import UsageError
from tests.helpers import Fleet, deploy_bg, finish, wait_for, wait_prompt
from tests.stepsys import make_db, make_system


def status(fleet: Fleet, host: str) -> dict[str, Any]:
    _, rows = fleet.fleetctl_json("status", host)
    row: dict[str, Any] = rows[0]
    return row


def reboot_system(root: Path, name: str) -> Path:
    top = root / name
    top.mkdir(parents=True)
    (top / "sim-needs-reboot").write_text("kernel differs\n")
    return top


def journaled_reboot(fleet: Fleet, host: str) -> bool:
    return any(r["kind"] == "note" and r.get("key") == "reboot_boot_id"
               for r in fleet.journal(host))


def test_answer_while_open_runs_a_per_choice_only_migration(make_fleet: Any,  # symptom 1
                                                            tmp_path: Path) -> None:
    fleet = make_fleet({"pg1": ["db"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05,
                      only_db=True)
    fleet.start_agent("pg1")
    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--timeout", "60")
    prompt = wait_prompt(fleet, "pg1", "choice")
    r = fleet.fleetctl("answer", "pg1", prompt["prompt_id"], "db.major=dump-restore")
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = finish(proc)
    assert rc == 0 and out["hosts"] == {"pg1": "succeeded"}, out
    assert (db / "data").read_bytes() == original + b"restored-dump-restore\n"


def test_reboot_window_wait_is_visible_approvable_and_survives_a_restart(  # symptoms 3, 4
        make_fleet: Any, tmp_path: Path) -> None:
    fleet = make_fleet({"rb1": ["x"]})
    opens = datetime.now() + timedelta(hours=6)
    window = f"window {opens:%H:%M}-{opens + timedelta(hours=1):%H:%M}"
    top = reboot_system(tmp_path, "new-kernel")
    agent = fleet.start_agent("rb1")
    proc = deploy_bg(fleet, "rb1", "--system", str(top), "--reboot", window, "--timeout", "90")
    prompt = wait_prompt(fleet, "rb1", "reboot")
    row = wait_for(lambda: (s := status(fleet, "rb1"))["phase"] == "awaiting_reboot" and s,
                   what="awaiting_reboot")
    assert row["needs_reboot"] is True  # Home Assistant's Reboot button is usable
    assert f"{opens:%H:%M}" in row["message"]
    # restarting the agent keeps the same wait (the same prompt), not a jam
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    restarted = time.time()
    agent = fleet.start_agent("rb1")
    wait_for(lambda: (s := status(fleet, "rb1"))["updated_at"] > restarted
             and s["phase"] == "awaiting_reboot" and s["needs_reboot"],
             what="the restarted agent waiting for the reboot again")
    again = wait_prompt(fleet, "rb1", "reboot")
    assert (again["prompt_id"], again["items"]) == (prompt["prompt_id"], prompt["items"])
    # `fleetctl approve` starts the pending reboot now (the policy lets a person do so)
    r = fleet.fleetctl("approve", "rb1")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: journaled_reboot(fleet, "rb1"), what="the journaled reboot")
    agent.send_signal(signal.SIGKILL)  # the host goes down...
    agent.wait()
    fleet.start_agent("rb1")           # ...and boots with a new boot id
    rc, out = finish(proc, timeout=90)
    assert rc == 0 and out["hosts"] == {"rb1": "succeeded"}, out
    answers = [r for r in fleet.journal("rb1") if r["kind"] == "answer"]
    assert [a["choices"] for a in answers] == [{"deploy.reboot": "now"}]
    assert status(fleet, "rb1")["needs_reboot"] is False


def test_waits_end_by_a_newer_deploy_cancel_and_rollback(make_fleet: Any,  # symptom 3
                                                         tmp_path: Path) -> None:
    fleet = make_fleet({"w1": ["x"]})
    fleet.start_agent("w1")
    a, b, c = (tmp_path / n for n in ("sys-a", "sys-b", "sys-c"))
    for p in (a, b, c):
        p.mkdir()
    # an approval wait is superseded by a newer desired state
    first = deploy_bg(fleet, "w1", "--system", str(a), "--approval", "ask", "--timeout", "60")
    wait_prompt(fleet, "w1", "approval")
    rc, out = fleet.fleetctl_json("deploy", "w1", "--system", str(b), "--timeout", "60")
    assert rc == 0 and out["hosts"] == {"w1": "succeeded"}, out
    rc, out = finish(first)
    assert out["hosts"] == {"w1": "cancelled"}, out
    assert status(fleet, "w1")["system"] == str(b)
    # fleetctl cancel ends an approval wait: recorded cancelled, nothing changed
    second = deploy_bg(fleet, "w1", "--system", str(c), "--approval", "ask", "--timeout", "60")
    wait_prompt(fleet, "w1", "approval")
    r = fleet.fleetctl("cancel", "w1", "--reason", "not this week")
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = finish(second)
    assert out["hosts"] == {"w1": "cancelled"}, out
    row = status(fleet, "w1")
    assert row["system"] == str(b) and "not this week" in row["message"], row
    results = [r for r in fleet.journal("w1") if r["kind"] == "result"]
    assert [r["status"] for r in results] == ["cancelled", "succeeded", "cancelled"]
    # fleetctl rollback supersedes a wait too, and undoes b
    third = deploy_bg(fleet, "w1", "--system", str(c), "--approval", "ask", "--timeout", "60")
    wait_prompt(fleet, "w1", "approval")
    rc, out = fleet.fleetctl_json("rollback", "w1", "--timeout", "60")
    assert rc == 0 and out["hosts"] == {"w1": "succeeded"}, out
    rc, out = finish(third)
    assert out["hosts"] == {"w1": "cancelled"}, out


def test_not_now_defers_without_timing_out_and_approve_proceeds(make_fleet: Any,  # item 6
                                                                tmp_path: Path) -> None:
    fleet = make_fleet({"d1": ["x"]})
    fleet.start_agent("d1", "--defer-tonight", "21:30")
    top = tmp_path / "sys"
    top.mkdir()
    started = time.monotonic()
    proc = deploy_bg(fleet, "d1", "--system", str(top), "--approval", "ask",
                     "--host-timeout", "15", "--timeout", "90")
    prompt = wait_prompt(fleet, "d1", "approval")
    labels = {c["id"]: c["label"] for c in prompt["items"][0]["choices"]}
    assert labels["defer-tonight"] == "Tonight at 21:30" and set(labels) == {
        "approve", "defer-1h", "defer-tonight", "defer-tomorrow"}
    before = time.time()
    r = fleet.fleetctl("approve", "d1", "--defer", "defer-1h")
    assert r.returncode == 0 and "deferred until" in r.stdout, r.stdout + r.stderr
    row = wait_for(lambda: (s := status(fleet, "d1"))["message"].startswith("deferred until")
                   and s, what="deferred until T in the host state")
    assert row["phase"] == "awaiting_approval"
    # the deferral (an hour) does not count against --host-timeout 15
    time.sleep(max(0.0, started + 18 - time.monotonic()))
    assert proc.poll() is None, finish(proc)
    # `fleet-agent prompt --approve` (the desktop notification's command) approves now
    r2 = subprocess.run([sys.executable, "-m", "client", "prompt", "--state-dir",
                         str(fleet.state_dir("d1")), "--approve"], capture_output=True,
                        text=True, timeout=30)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    rc, out = finish(proc)
    assert rc == 0 and out["hosts"] == {"d1": "succeeded"}, out
    answers = [r for r in fleet.journal("d1") if r["kind"] == "answer"]
    assert [a["choices"]["deploy.approve"] for a in answers] == ["defer-1h", "approve"]
    assert before + 3590 < answers[0]["deferred_until"] < time.time() + 3610


def test_failure_prompt_keeps_its_id_and_deadline_across_a_restart(  # issue 11 item 9
        make_fleet: Any, tmp_path: Path) -> None:
    fleet = make_fleet({"f1": ["db"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05,
                      fail_step="db", only_db=True)
    agent = fleet.start_agent("f1")
    proc = deploy_bg(fleet, "f1", "--system", str(top), "--choose", "db.major=upgrade",
                     "--prompt-deadline", "3600", "--timeout", "60")
    prompt = wait_prompt(fleet, "f1", "step_failure")
    # a restart used to issue a new id (…failure2) and a new deadline
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    restarted = time.time()
    fleet.start_agent("f1")
    wait_for(lambda: (s := status(fleet, "f1"))["updated_at"] > restarted
             and s["phase"] == "awaiting_choice", what="the restarted agent waiting again")
    again = wait_prompt(fleet, "f1", "step_failure")
    assert (again["prompt_id"], again["deadline"]) == (prompt["prompt_id"], prompt["deadline"])
    r = fleet.fleetctl("answer", "f1", prompt["prompt_id"], "db.failed=rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = finish(proc)
    assert out["hosts"] == {"f1": "rolled_back"}, out
    assert (db / "data").read_bytes() == original


def test_rolling_back_a_first_deployment_agrees_everywhere(make_fleet: Any,  # symptom 6
                                                           tmp_path: Path) -> None:
    fleet = make_fleet({"r1": ["x"]})
    fleet.start_agent("r1")
    top = tmp_path / "first"
    top.mkdir()
    rc, out = fleet.fleetctl_json("deploy", "r1", "--system", str(top))
    assert rc == 0, out
    assert (status(fleet, "r1")["system"], status(fleet, "r1")["generation"]) == (str(top), 1)
    rc, out = fleet.fleetctl_json("rollback", "r1")
    assert rc == 0 and out["hosts"] == {"r1": "succeeded"}, out
    row = status(fleet, "r1")  # it showed the rolled-back system and generation 1
    assert (row["system"], row["generation"]) == (None, 0), row
    last = [r for r in fleet.journal("r1") if r["kind"] == "result"][-1]
    assert last["system"] is None and last.get("installed") == 0


def test_backend_is_chosen_and_logged_and_help_shows_defaults(tmp_path: Path) -> None:  # 9
    from client.cli import build_parser, choose_backend
    assert choose_backend("auto", tmp_path)[0] == "sim"
    with pytest.raises(UsageError, match="no NixOS host"):  # not a failure at each deploy
        choose_backend("nixos", tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "current-system").symlink_to(tmp_path)
    backend, why = choose_backend("auto", tmp_path)
    assert backend == "nixos" and "current-system exists" in why
    assert choose_backend("sim", tmp_path) == ("sim", "--backend sim")
    assert choose_backend("nixos", tmp_path) == ("nixos", "--backend nixos")
    out = subprocess.run([sys.executable, "-m", "client", "run", "--help"],
                         capture_output=True, text=True, timeout=30, env={"COLUMNS": "400",
                                                                           "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
               if a.prog.endswith(" run"))
    text = " ".join(out.stdout.split())
    for action in run._actions:
        if action.default not in (None, False, "==SUPPRESS==") and action.option_strings:
            assert f"(default: {action.default})" in text, action.option_strings
    assert "--backend {auto,sim,nixos}" in text


def test_disk_full_on_accept_records_the_failure_and_keeps_serving(make_fleet: Any,  # 5
                                                                   tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs (run as root): {r.stderr.strip()}"
    try:
        fleet = make_fleet({"full": ["x"]})
        state = mnt / "full"
        state.mkdir()
        argv = fleet.agent_argv("full")
        argv[argv.index("--state-dir") + 1] = str(state)
        log = open(fleet.root / "full.log", "wb")  # noqa: SIM115
        fleet.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        wait_for(lambda: (state / "journal.reserve").exists(), what="agent start")
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        big = "/nix/store/" + "x" * 4000  # its accept record cannot fit in what is left
        rc, out = fleet.fleetctl_json("deploy", "full", "--system", big, "--timeout", "30")
        assert rc == 1 and out["hosts"] == {"full": "failed"}, out
        row = status(fleet, "full")
        assert "No space left on device" in row["message"] and row["result"] == "failed", row
        results = [json.loads(x) for x in (state / "journal.jsonl").read_text().splitlines()
                   if x and json.loads(x)["kind"] == "result"]
        assert results[-1]["status"] == "failed"
        assert "No space left" in results[-1]["message"]
        filler.unlink()
        ok = tmp_path / "ok"
        ok.mkdir()
        rc, out = fleet.fleetctl_json("deploy", "full", "--system", str(ok), "--timeout", "30")
        assert rc == 0 and out["hosts"] == {"full": "succeeded"}, out  # it kept serving
    finally:
        fleet.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
