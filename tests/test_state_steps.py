"""Issue 3: predict, choose, migrate, dump and roll back, with real step programs."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.helpers import deploy_bg, finish, wait_for, wait_prompt
from tests.stepsys import make_db, make_system, runs


def setup(make_fleet, tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    fleet = make_fleet({"pg1": ["db"], "pg2": ["db"]})
    db = tmp_path / "db"
    original = make_db(db)
    runlog = tmp_path / "runs.log"
    top = make_system(tmp_path / "systems", "sys-a", db, runlog, **kw)
    return fleet, db, original, runlog, top





def test_check_prediction_table(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path)
    fleet.start_simulated(["pg1", "pg2"])
    rc, out = fleet.fleetctl_json("deploy", "@db", "--system", str(top), "--check")
    assert rc == 0, out
    assert out["go"] is True
    rows = {h["host"]: h for h in out["hosts"]}
    assert set(rows) == {"pg1", "pg2"}
    for row in rows.values():
        assert row["errors"] == []
        assert [w["id"] for w in row["warnings"]] == ["major"]
        assert row["recommendations"][0]["message"] == "consider vacuuming first"
        assert row["open_choices"] == [{"step": "db", "id": "major",
                                        "message": row["warnings"][0]["message"]}]
    # a pre-answer covers the open choice
    rc, out = fleet.fleetctl_json("deploy", "@db", "--system", str(top), "--check",
                                  "--choose", "db.major=upgrade")
    assert rc == 0 and all(h["open_choices"] == [] for h in out["hosts"])
    # nothing was switched or migrated by --check, and the data is untouched
    _, status = fleet.fleetctl_json("status")
    assert all(r["system"] is None for r in status)
    assert runs(runlog) == [] and (db / "data").read_bytes() == original
    # an error item without choices is a no-go, exit 1
    bad = make_system(tmp_path / "systems", "sys-err", db, runlog, error_item=True)
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", str(bad), "--check")
    assert rc == 1 and out["go"] is False
    assert [e["id"] for e in out["hosts"][0]["errors"]] == ["uid"]


def test_broken_checks_become_error_items(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path)
    broken = make_system(tmp_path / "systems", "sys-broken", db, runlog, broken_checks=True)
    fleet.start_simulated(["pg1"])
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", str(broken), "--check")
    assert rc == 1 and out["go"] is False
    errors = {(e["step"], e["id"]) for e in out["hosts"][0]["errors"]}
    assert ("crashes", "check-invalid-output") in errors or ("crashes", "check-failed") in errors
    assert ("garbage", "check-invalid-output") in errors
    assert ("wrongshape", "check-invalid-output") in errors
    assert ("missing", "check-failed") in errors
    # a real deploy of that system is blocked with a clear result, nothing migrated
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", str(broken),
                                  "--choose", "db.major=upgrade")
    assert rc == 1 and out["hosts"]["pg1"] == "blocked"
    assert runs(runlog) == [] and (db / "data").read_bytes() == original
    _, status = fleet.fleetctl_json("status", "pg1")
    assert "blocked by check errors" in status[0]["message"]


def test_choice_answered_remotely_then_migrations_in_dependency_order(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path)
    fleet.start_simulated(["pg1"])
    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--timeout", "60")
    prompt = wait_prompt(fleet, "pg1")
    assert prompt["kind"] == "choice"
    item = prompt["items"][0]
    assert (item["step"], item["id"], item["default"]) == ("db", "major", "upgrade")
    assert {c["id"]: c["destructive"] for c in item["choices"]} == \
        {"upgrade": False, "dump-restore": True}
    # a wrong choice is refused and the prompt stays open
    r = fleet.fleetctl("answer", "pg1", prompt["prompt_id"], "db.major=yolo")
    assert r.returncode == 1 and "yolo" in r.stdout
    r = fleet.fleetctl("answer", "pg1", prompt["prompt_id"], "db.major=dump-restore")
    assert r.returncode == 0, r.stderr + r.stdout
    rc, out = finish(proc)
    assert rc == 0 and out["hosts"] == {"pg1": "succeeded"}
    assert (db / "data").read_bytes() == original + b"restored-dump-restore\napp\n"
    events = runs(runlog)
    t = {(s, e): ts for s, e, ts, _ in events}
    assert [c for s, e, _, c in events if s == "db" and e == "start"] == ["dump-restore"]
    assert t[("db", "end")] <= t[("app", "start")]          # app after db
    assert t[("cache", "end")] <= t[("search", "start")]    # search after cache
    assert t[("cache", "start")] < t[("db", "end")]         # independent branches overlap
    assert t[("db", "start")] < t[("cache", "end")]
    # a second answer to the closed prompt is told so
    r = fleet.fleetctl("answer", "pg1", prompt["prompt_id"], "db.major=upgrade")
    assert r.returncode == 1 and "is not open on pg1" in r.stdout, r.stdout + r.stderr
    # the dump of db exists, keyed by revision and generation, compressed
    dumps = list((fleet.state_dir("pg1") / "dumps" / "db").glob("16-*/dump.tar.zst"))
    assert len(dumps) == 1


def test_pre_answer_needs_no_prompt(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path)
    fleet.start_simulated(["pg1"])
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", str(top),
                                  "--choose", "db.major=upgrade")
    assert rc == 0, out
    assert (db / "data").read_bytes() == original + b"upgraded-upgrade\napp\n"
    _, rows = fleet.fleetctl_json("prompts")
    assert rows == []


def test_prompt_survives_agent_restart(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path)
    agent = fleet.start_agent("pg1")
    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--timeout", "60")
    prompt = wait_prompt(fleet, "pg1")
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    starts = sum(r["kind"] == "start" for r in fleet.journal("pg1"))
    fleet.start_agent("pg1")
    wait_for(lambda: sum(r["kind"] == "start" for r in fleet.journal("pg1")) > starts,
             timeout=30, what="the restarted agent")
    again = wait_prompt(fleet, "pg1")
    assert again["prompt_id"] == prompt["prompt_id"]
    r = fleet.fleetctl("answer", "pg1", prompt["prompt_id"], "db.major=upgrade")
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = finish(proc)
    assert rc == 0 and out["hosts"] == {"pg1": "succeeded"}
    assert (db / "data").read_bytes() == original + b"upgraded-upgrade\napp\n"
    assert sum(1 for r in fleet.journal("pg1") if r["kind"] == "prompt") == 1


def test_failing_migration_prompts_and_rollback_restores_bytes(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, _ = setup(make_fleet, tmp_path)
    table = (db / "sub" / "table").read_bytes()
    top = make_system(tmp_path / "systems", "sys-fail", db, runlog, fail_step="app")
    fleet.start_simulated(["pg1"])
    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--choose", "db.major=upgrade",
                     "--timeout", "60")
    prompt = wait_prompt(fleet, "pg1", kind="step_failure")
    item = prompt["items"][0]
    assert (item["step"], item["id"]) == ("app", "failed")
    assert "boom: disk on fire" in item["message"]
    assert {c["id"] for c in item["choices"]} == {"retry", "skip", "rollback"}
    # the db migration changed the data before app failed
    assert (db / "data").read_bytes() != original
    r = fleet.fleetctl("answer", "pg1", prompt["prompt_id"], "app.failed=rollback")
    assert r.returncode == 0
    rc, out = finish(proc)
    assert rc == 1 and out["hosts"] == {"pg1": "rolled_back"}
    assert (db / "data").read_bytes() == original          # byte for byte
    assert (db / "sub" / "table").read_bytes() == table
    _, status = fleet.fleetctl_json("status", "pg1")
    assert status[0]["result"] == "rolled_back" and status[0]["system"] is None


def test_failed_step_retry_and_skip_by_policy(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, _ = setup(make_fleet, tmp_path)
    top = make_system(tmp_path / "systems", "sys-fail", db, runlog, fail_step="cache",
                      sleep=0.05)
    fleet.start_simulated(["pg1"])
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", str(top), "--choose",
                                  "db.major=upgrade", "--on-step-failure", "skip")
    assert rc == 0, out
    steps_run = [s for s, e, _, _ in runs(runlog) if e == "start"]
    assert steps_run.count("cache") == 1 and "search" in steps_run


PIPELINE = {"fetch", "check", "choose", "dump", "switch", "reboot", "confirm"}


@pytest.mark.parametrize("boundary", [
    "begin:fetch", "end:fetch", "end:check", "begin:dump", "end:dump",
    "begin:db", "end:db", "begin:app", "begin:cache", "end:search",
    "begin:switch", "end:switch", "begin:confirm",
])
def test_sigkill_at_step_boundaries_resumes_without_rerunning(make_fleet, tmp_path: Path, boundary: str) -> None:  # type: ignore[no-untyped-def]
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path, sleep=0.4,
                                             idempotent=("cache", "search"))
    agent = fleet.start_agent("pg1", "--sim-fetch-delay", "0.3", "--sim-switch-delay", "0.3")
    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--choose", "db.major=upgrade",
                     "--on-step-failure", "retry", "--timeout", "90")
    kind, name = boundary.split(":")
    stage = name if name in PIPELINE else f"step:{name}"

    def reached():  # type: ignore[no-untyped-def]
        try:
            return any(r["kind"] == kind and r.get("stage") == stage for r in fleet.journal("pg1"))
        except (FileNotFoundError, ValueError):
            return False
    wait_for(reached, timeout=30, interval=0.02, what=boundary)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    at_kill = fleet.journal("pg1")
    begun = {r["stage"][5:] for r in at_kill if r["kind"] == "begin"
             and r.get("stage", "").startswith("step:")}
    ended = {r["stage"][5:] for r in at_kill if r["kind"] == "end"
             and r.get("stage", "").startswith("step:")}
    interrupted = begun - ended
    fleet.start_agent("pg1")
    rc, out = finish(proc, timeout=90)
    assert rc == 0, out
    journal = fleet.journal("pg1")
    completed = {r["stage"][5:] for r in journal
                 if r["kind"] == "end" and r.get("stage", "").startswith("step:")}
    assert completed == {"db", "app", "cache", "search"}
    starts = [s for s, e, _, _ in runs(runlog) if e == "start"]
    for step in ("db", "app", "cache", "search"):
        if step in interrupted:
            # killed mid-run: its program may not have started yet, or (orphaned) may have
            # finished anyway; either way the agent runs it again exactly once
            assert starts.count(step) in (1, 2), (step, runs(runlog))
        else:
            # completed before the kill, or started after it: exactly one run
            assert starts.count(step) == 1, (step, runs(runlog))
    assert (db / "data").read_bytes() == (original + b"upgraded-upgrade\n" * starts.count("db")
                                          + b"app\n" * starts.count("app"))


def test_fleetctl_rollback_restores_data_and_previous_system(make_fleet, tmp_path: Path) -> None:
    fleet, db, original, runlog, top = setup(make_fleet, tmp_path)
    fleet.start_simulated(["pg1"])
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", "/nix/store/old-system")
    assert rc == 0, out
    rc, out = fleet.fleetctl_json("deploy", "pg1", "--system", str(top), "--choose",
                                  "db.major=upgrade")
    assert rc == 0, out
    assert (db / "data").read_bytes() == original + b"upgraded-upgrade\napp\n"
    rc, out = fleet.fleetctl_json("rollback", "pg1")
    assert rc == 0 and out["hosts"] == {"pg1": "succeeded"}, out
    assert (db / "data").read_bytes() == original       # data back, byte for byte
    _, rows = fleet.fleetctl_json("status", "pg1")
    assert rows[0]["system"] == "/nix/store/old-system"  # code back
    # nothing left to roll back: a second rollback fails with a clear message
    rc, out = fleet.fleetctl_json("rollback", "pg1")
    assert rc == 1 and out["hosts"] == {"pg1": "failed"}
    _, rows = fleet.fleetctl_json("status", "pg1")
    assert "nothing to roll back" in rows[0]["message"]
