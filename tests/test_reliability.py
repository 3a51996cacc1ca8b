"""Issue 7 reliability: broker crash mid-rollout, stuck agents, event floods, full disks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.codec import encode
from protocol.models import Progress
from protocol.topics import Topics
from tests.helpers import (
    deploy_bg,
    finish,
    mqtt_client,
    publish,
    wait_for,
    wait_online,
    wait_prompt,
)


def test_broker_sigkill_mid_rollout_loses_no_result(make_fleet, broker) -> None:  # type: ignore[no-untyped-def]
    hosts = [f"h{i:02d}" for i in range(50)]
    fleet = make_fleet({h: ["all"] for h in hosts})
    fleet.start_simulated(hosts, "--sim-fetch-delay", "1.0", "--sim-switch-delay", "1.5")
    wait_online(fleet, hosts)
    proc = deploy_bg(fleet, "@all", "--system", "/nix/store/x-sys", "--timeout", "90")
    # desired states delivered and journaled: every host mid-deploy (fetch takes 1 s)
    wait_for(lambda: all(any(r["kind"] == "accept" for r in fleet.journal(h)) for h in hosts),
             what="every host to accept its desired state")
    broker.kill()    # SIGKILL: no clean shutdown
    time.sleep(1.0)  # the scenario: the broker stays down for a second
    broker.start()   # same port, same persistence directory
    rc, out = finish(proc)
    assert rc == 0, out
    assert out["succeeded"] == 50 and out["failed"] == 0
    assert set(out["hosts"].values()) == {"succeeded"}
    # every host applied exactly one generation
    for h in hosts:
        accepts = [r for r in fleet.journal(h) if r["kind"] == "accept"]
        assert len(accepts) == 1


def test_deploy_whose_broker_stays_away_exits_3_and_stays_resumable(make_fleet, broker) -> None:  # type: ignore[no-untyped-def]
    """It waited until --timeout and ended `timed_out` (exit 1), recording the hosts as
    timed out although they were still deploying. Now, once reconnecting has failed for
    --connect-timeout, it says so in one line naming `fleetctl rollout resume`, exits 3
    and leaves the rollout running in the log; the resume, with the broker back, ends it."""
    fleet = make_fleet({"w1": ["web"]})
    fleet.start_simulated(["w1"], "--sim-fetch-delay", "2")
    wait_online(fleet, ["w1"])
    proc = deploy_bg(fleet, "w1", "--system", "/nix/store/x-sys", "--timeout", "300",
                     "--connect-timeout", "2")
    wait_for(lambda: any(r["kind"] == "accept" for r in fleet.journal("w1")),
             what="w1 to accept its desired state")
    broker.kill()
    lost = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert time.monotonic() - lost < 30  # the connect timeout, not the deploy's 300 s
    errors = [ln for ln in err.splitlines() if ln.startswith("fleetctl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    _, rows = fleet.fleetctl_json("rollouts")  # the event log only: no broker needed
    rid = rows[-1]["id"]
    assert f"`fleetctl rollout resume {rid}`" in errors[0] and "broker" in errors[0], errors
    assert rows[-1]["status"] == "running" and rows[-1]["counts"]["timed_out"] == 0, rows
    broker.start()  # same port, same persistence directory
    rc, out = fleet.fleetctl_json("rollout", "resume", rid, "--timeout", "60")
    assert rc == 0 and out["hosts"] == {"w1": "succeeded"}, out


def test_stuck_agent_does_not_hold_up_the_others(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"slow": ["all"], **{f"fast{i}": ["all"] for i in range(5)}})
    fleet.start_simulated([f"fast{i}" for i in range(5)])
    fleet.start_agent("slow", "--sim-fetch-delay", "120")
    wait_online(fleet, list(fleet.hosts))
    started = time.monotonic()
    rc, out = fleet.fleetctl_json("deploy", "@all", "--system", "/nix/store/y",
                                  "--host-timeout", "4", "--timeout", "60")
    elapsed = time.monotonic() - started
    assert rc == 1
    assert out["hosts"]["slow"] == "timed_out"
    assert all(out["hosts"][f"fast{i}"] == "succeeded" for i in range(5))
    assert out["succeeded"] == 5 and out["timed_out"] == 1
    assert elapsed < 30  # bounded by the host timeout, not by the stuck agent


async def test_event_flood_does_not_stall_the_controller(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({**{f"n{i}": ["all"] for i in range(5)}, "noisy": ["other"]})
    fleet.start_simulated([f"n{i}" for i in range(5)], "--sim-fetch-delay", "1.0")
    await asyncio.to_thread(wait_online, fleet, [f"n{i}" for i in range(5)])
    proc = deploy_bg(fleet, "@all", "--system", "/nix/store/z", "--timeout", "60")
    topic = Topics(fleet.prefix).events("noisy")
    async with mqtt_client(fleet.broker_url, max_inflight_messages=1000) as client:
        for i in range(10_000):
            ev = Progress(host="noisy", deployment_id="flood", generation=1, seq=i,
                          time=time.time(), stage="fetch", message="x" * 50)
            await client.publish(topic, encode(ev), qos=0)
    rc, out = await asyncio.to_thread(finish, proc)
    assert rc == 0, out
    assert out["succeeded"] == 5


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_the_deploy_with_a_clear_result(make_fleet, tiny_disk: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"full": ["x"]})
    state = tiny_disk / "full"
    state.mkdir()
    argv = fleet.agent_argv("full")
    argv[argv.index("--state-dir") + 1] = str(state)
    log = open(fleet.root / "full.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    fleet.procs.append(proc)
    wait_for(lambda: (state / "journal.reserve").exists(), what="agent start")
    # fill the disk: what is left is less than one journal record
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    rc, out = fleet.fleetctl_json("deploy", "full", "--system", "/nix/store/d", "--timeout",
                                  "30")
    assert rc == 1 and out["hosts"]["full"] in ("failed", "rolled_back")
    _, rows = fleet.fleetctl_json("status", "full")
    assert "No space left on device" in rows[0]["message"], rows[0]
    assert rows[0]["system"] is None  # nothing was switched
    assert proc.poll() is None  # the agent keeps serving
    # nothing half-written is trusted: after restart with space, the failure is the record
    filler.unlink()
    proc.terminate()
    proc.wait(10)
    records = [json.loads(x) for x in (state / "journal.jsonl").read_text().splitlines() if x]
    results = [r for r in records if r["kind"] == "result"]
    assert [r["status"] for r in results] == [out["hosts"]["full"]]
    before = len(records)
    proc2 = subprocess.Popen(argv, stdout=log, stderr=log)
    fleet.procs.append(proc2)
    def journaled() -> list[dict[str, object]]:
        return [json.loads(x) for x in (state / "journal.jsonl").read_text().splitlines() if x]
    wait_for(lambda: len(journaled()) > before, timeout=30, what="the restarted agent")
    time.sleep(2.0)  # time to (not) act on the retained desired state
    assert [r["kind"] for r in journaled()[before:]] == ["start"]  # the deploy is not re-run


def test_read_only_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a read-only tmpfs: {r.stderr.strip()}")
    try:
        from controller.state.keys import init_keys
        _, pub = init_keys(tmp_path / "keys")
        r = subprocess.run([sys.executable, "-m", "client", "run", "--host", "ro1",
                            "--state-dir", str(ro / "state"), "--trust-key", str(pub)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert "Read-only file system" in lines[0]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


async def test_malformed_payloads_on_agent_topics_never_crash_it(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"tough": ["x"]})
    agent = fleet.start_agent("tough")
    await asyncio.to_thread(wait_online, fleet, ["tough"])
    t = Topics(fleet.prefix)

    async def junk(*topics: str) -> None:
        for topic in topics:
            for payload in (b"\x00", b"\xff" * 1000, b"{}", b"\x93\x01\x02\x03",
                            b"x" * 300_000):
                await publish(fleet.broker_url, topic, payload)

    await junk(t.desired("tough"), t.confirm("tough"))  # idle
    await publish(fleet.broker_url, t.desired("tough"), b"", retain=True)
    # The agent reads `answer` while a deployment is active: junk on it (and on the
    # others) while a prompt is open, and the prompt is still answered.
    proc = deploy_bg(fleet, "tough", "--system", "/nix/store/ok", "--approval", "ask",
                     "--timeout", "60")
    await asyncio.to_thread(wait_prompt, fleet, "tough", "approval")
    await junk(t.answer("tough"), t.confirm("tough"), t.desired("tough"))
    r = await asyncio.to_thread(fleet.fleetctl, "approve", "tough")
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = await asyncio.to_thread(finish, proc)
    assert rc == 0 and out["hosts"] == {"tough": "succeeded"}, out
    assert agent.poll() is None  # still running


def test_a_controller_that_cannot_write_its_log_mid_rollout_stops_it_resumable(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    """The controller's log stops taking writes (a full or failing disk; here the file
    size limit, EFBIG, which is exact where a full tmpfs still has the file's last page)
    while a host waits for an answer, so its result cannot be recorded. The deploy stops
    with one line naming the cause and the resume command; what the log holds stays
    whole, and once writes work again `rollout resume` records the host's result."""
    import resource

    from tests.stepsys import asking_system
    fleet = make_fleet({"pg1": ["db"]})
    state = fleet.controller_dir
    env = fleet.env()
    top = asking_system(tmp_path)
    fleet.start_simulated(["pg1"])
    proc = subprocess.Popen([sys.executable, "-m", "controller", "deploy", "pg1", "--system",
                             str(top), "--timeout", "60", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def waiting() -> bool:
            r = subprocess.run([sys.executable, "-m", "controller", "prompts", "--json"],
                               env=env, capture_output=True, text=True)
            return r.returncode == 0 and bool(json.loads(r.stdout))
        wait_for(waiting, timeout=30, what="pg1 to wait for its answer")
        log_before = (state / "state.jsonl").read_bytes()
        limit = len(log_before) + 16  # no room for the next entry
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        r = subprocess.run([sys.executable, "-m", "controller", "answer", "pg1",
                            "db.major=upgrade"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "File too large" in lines[0] \
        and "fleetctl rollout resume" in lines[0], err
    assert (state / "state.jsonl").read_bytes() == log_before  # whole, nothing half-written
    rid = json.loads(subprocess.run([sys.executable, "-m", "controller", "rollouts", "--json"],
                                    env=env, capture_output=True, text=True).stdout)[0]["id"]
    r = subprocess.run([sys.executable, "-m", "controller", "rollout", "resume", rid,
                        "--timeout", "30", "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["hosts"]["pg1"] \
        == "succeeded", r.stdout + r.stderr
