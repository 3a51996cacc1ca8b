"""Issue 6 end to end: the real agent, a real broker, the on-host prompt through a
pseudo-terminal, deadlines and `fleetctl approve`. Home Assistant's side runs against a
real Home Assistant core in tests/test_ha_real.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pexpect

from client.ask import homeassistant as ha
from protocol.topics import Topics
from tests.helpers import deploy_bg, finish, publish, wait_online, wait_prompt
from tests.stepsys import make_db, make_system


def test_fleet_agent_prompt_through_a_terminal(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"tty1": ["x"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05)
    fleet.start_agent("tty1", "--control-group", "root")
    proc = deploy_bg(fleet, "tty1", "--system", str(top), "--timeout", "60")
    prompt = wait_prompt(fleet, "tty1", "choice")
    child = pexpect.spawn(sys.executable, ["-m", "client", "prompt", "--state-dir",
                                           str(fleet.state_dir("tty1"))],
                          encoding="utf-8", timeout=20)
    child.expect("db.major")
    child.expect("DESTRUCTIVE")           # dump-restore is marked
    child.expect(r"\[Enter = upgrade\]")  # the default is preselected
    child.sendline("2")                   # choose the second option (dump-restore)
    child.expect("(?i)yes")       # a destructive choice needs a typed confirmation
    child.sendline("yes")
    child.expect("(?i)accepted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    rc, out = finish(proc)
    assert rc == 0, out
    assert (db / "data").read_bytes() == original + b"restored-dump-restore\napp\n"
    answers = [r for r in fleet.journal("tty1") if r["kind"] == "answer"]
    assert answers[-1]["source"].startswith("local:")
    assert answers[-1]["prompt_id"] == prompt["prompt_id"]
    # a scripted answer to the closed prompt is refused: the first answer won
    r = subprocess.run([sys.executable, "-m", "client", "prompt", "--state-dir",
                        str(fleet.state_dir("tty1")), "--answer", prompt["prompt_id"],
                        "db.major=upgrade"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_deadline_takes_the_default_and_records_it(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"dl1": ["x"]})
    db = tmp_path / "db"
    original = make_db(db)
    top = make_system(tmp_path / "systems", "sys", db, tmp_path / "runs.log", sleep=0.05)
    fleet.start_agent("dl1")
    rc, out = fleet.fleetctl_json("deploy", "dl1", "--system", str(top), "--prompt-deadline",
                                  "1.5", "--take-default", "--timeout", "60")
    assert rc == 0, out
    assert (db / "data").read_bytes() == original + b"upgraded-upgrade\napp\n"
    answers = [r for r in fleet.journal("dl1") if r["kind"] == "answer"]
    assert len(answers) == 1
    assert answers[0]["source"] == "deadline" and answers[0]["choices"] == {"db.major": "upgrade"}
    prompts = [r for r in fleet.journal("dl1") if r["kind"] == "prompt"]
    assert prompts[0]["prompt"]["deadline"] is not None


def test_fleetctl_approve_releases_hosts_waiting_for_approval(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"ap1": ["x"], "ap2": ["x"]})
    fleet.start_simulated(["ap1", "ap2"])
    proc = deploy_bg(fleet, "@x", "--system", "/nix/store/approved", "--approval", "ask",
                     "--timeout", "60")
    for host in ("ap1", "ap2"):
        wait_prompt(fleet, host, "approval")
    _, status = fleet.fleetctl_json("status")
    assert {r["phase"] for r in status} == {"awaiting_approval"}
    assert all(r["system"] is None for r in status)  # nothing switched before approval
    rc, out = fleet.fleetctl_json("approve", "@x")
    assert rc == 0 and set(out) == {"ap1", "ap2"} and all(v["accepted"] for v in out.values())
    rc, result = finish(proc)
    assert rc == 0 and result["succeeded"] == 2, result


def test_a_home_assistant_press_while_the_host_is_away_is_not_carried_out_later(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    """Home Assistant shows a host that is away as unavailable; a command sent meanwhile
    (an automation pressing Install) is not queued for the agent and carried out when
    it is back, perhaps hours later: the approval still waits for someone present."""
    fleet = make_fleet({"ha1": ["x"]})
    agent = fleet.start_agent("ha1", "--home-assistant")
    proc = deploy_bg(fleet, "ha1", "--system", str(tmp_path), "--approval", "ask",
                     "--timeout", "90")
    wait_prompt(fleet, "ha1", "approval")
    agent.kill()
    agent.wait()
    token = ha.load_token(fleet.state_dir("ha1"))
    asyncio.run(publish(fleet.broker_url, Topics(fleet.prefix).ha_host("ha1", "update/install"),
                        ha.install_payload(token).encode()))
    fleet.start_agent("ha1", "--home-assistant")
    wait_online(fleet, ["ha1"])
    time.sleep(2)  # a negative check: what the broker would have queued arrives at once
    assert wait_prompt(fleet, "ha1", "approval", timeout=5)  # still waiting
    r = fleet.fleetctl("approve", "ha1")
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = finish(proc, timeout=90)
    assert (rc, out["hosts"]) == (0, {"ha1": "succeeded"}), out
