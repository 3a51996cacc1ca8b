"""Issue 5 end to end: rollouts over 20 simulated hosts through a real Mosquitto, with real
`fleetctl` processes (including one killed with SIGKILL and resumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from controller.state.eventlog import EventLog
from tests.helpers import Fleet, wait_for, wait_online

HOSTS = [f"h{i:02d}" for i in range(1, 21)]
SYSTEM = "/nix/store/bbbb-nixos-system-25.11"
FAILING = "/nix/store/cccc-sim-fail-switch"


def fleet20(make_fleet: Any) -> Fleet:
    fleet: Fleet = make_fleet({h: ["fleet"] for h in HOSTS})
    return fleet


def accepts(fleet: Fleet, host: str) -> list[tuple[str, int]]:
    return [(r["deployment_id"], r["generation"]) for r in fleet.journal(host)
            if r["kind"] == "accept"]


def results(fleet: Fleet, host: str) -> list[tuple[str, str]]:
    return [(r["deployment_id"], r["status"]) for r in fleet.journal(host)
            if r["kind"] == "result"]


def rollout_doc(fleet: Fleet, rid: str | None = None) -> dict[str, Any]:
    doc = EventLog(fleet.controller_dir).load() if (fleet.controller_dir /
                                                    "state.jsonl").exists() else {}
    rollouts = doc.get("rollouts", {})
    if rid is None:
        return next(iter(rollouts.values()), {})
    return dict(rollouts.get(rid, {}))


def start_deploy(fleet: Fleet, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "controller", "deploy", *args, "--json"],
                            env=fleet.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, f"no output (rc={proc.returncode}): {err}"
    return proc.returncode, json.loads(lines[-1])


def status_rows(fleet: Fleet) -> dict[str, dict[str, Any]]:
    rc, rows = fleet.fleetctl_json("status")
    assert rc == 0
    return {r["host"]: r for r in rows}


def one_line_error(r: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert fragment in lines[0], lines[0]


def test_abort_at_threshold_leaves_unstarted_hosts_untouched(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS, "--sim-fetch-delay", "0.05")
    rc, out = fleet.fleetctl_json("deploy", "@fleet", "--system", FAILING, "--batch", "5",
                                  "--max-failures", "1", "--min-executed", "2",
                                  "--timeout", "60")
    assert rc == 1
    assert set(out) == {"rollout", "status", "succeeded", "failed", "timed_out",
                        "not_started", "hosts", "logs"}
    assert out["status"] == "aborted"
    first, rest = HOSTS[:5], HOSTS[5:]
    # the first batch was running when the threshold tripped: it finished, not cancelled
    assert {out["hosts"][h] for h in first} == {"rolled_back"}
    assert all(out["hosts"][h] is None for h in rest)
    assert (out["succeeded"], out["failed"], out["timed_out"], out["not_started"]) == \
        (0, 5, 0, 15)
    rows = status_rows(fleet)
    for h in rest:  # never received a desired state
        assert rows[h]["generation"] == 0 and rows[h]["deployment"] is None, rows[h]
        assert accepts(fleet, h) == []
    for h in first:
        assert accepts(fleet, h) == [(out["rollout"], 1)]
    rc, shown = fleet.fleetctl_json("rollout", "show", out["rollout"])
    assert rc == 0 and shown["status"] == "aborted"
    assert "beyond the threshold" in shown["abort_reason"]
    assert all(shown["hosts"][h]["status"] == "pending" for h in rest)
    assert shown["counts"]["not_started"] == 15


def test_canary_failure_stops_all(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS[:2], "--sim-fail-rate", "1", "--sim-fail-stage", "fetch")
    fleet.start_simulated(HOSTS[2:])
    rc, out = fleet.fleetctl_json("deploy", "@fleet", "--system", SYSTEM, "--canary", "2",
                                  "--batch", "6", "--timeout", "60")
    assert rc == 1 and out["status"] == "aborted"
    assert out["hosts"]["h01"] == "failed" and out["hosts"]["h02"] == "failed"
    assert all(out["hosts"][h] is None for h in HOSTS[2:])
    assert out["not_started"] == 18 and out["failed"] == 2
    assert all(accepts(fleet, h) == [] for h in HOSTS[2:])
    r = rollout_doc(fleet, out["rollout"])
    assert r["abort_reason"].startswith("canary host h01 failed")


def test_retry_redeploys_a_failed_host_with_a_new_generation(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS[:1], "--sim-fail-rate", "1", "--sim-fail-stage", "fetch")
    fleet.start_simulated(HOSTS[1:])
    rc, out = fleet.fleetctl_json("deploy", "@fleet", "--system", SYSTEM, "--retries", "1",
                                  "--max-parallel", "8", "--timeout", "60")
    rid = out["rollout"]
    assert rc == 1 and out["status"] == "failed"
    assert out["succeeded"] == 19 and out["failed"] == 1 and out["hosts"]["h01"] == "failed"
    assert accepts(fleet, "h01") == [(rid, 1), (f"{rid}.2", 2)]
    assert all(accepts(fleet, h) == [(rid, 1)] for h in HOSTS[1:])  # no needless retries
    rc, shown = fleet.fleetctl_json("rollout", "show", rid)
    h01 = shown["hosts"]["h01"]
    assert (h01["attempts"], h01["generation"], h01["deployment_id"], h01["result"]) == \
        (2, 2, f"{rid}.2", "failed")
    # the next rollout continues the host's generations
    rc, out2 = fleet.fleetctl_json("deploy", "h02", "--system", SYSTEM + "-2")
    assert rc == 0 and accepts(fleet, "h02")[-1] == (out2["rollout"], 2)


def test_sigkill_mid_rollout_then_resume_gives_each_host_one_generation(
        make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS, "--sim-fetch-delay", "0.4", "--sim-switch-delay", "0.2")
    proc = start_deploy(fleet, "@fleet", "--system", SYSTEM, "--batch", "5",
                        "--timeout", "120")

    def second_batch_sent() -> dict[str, Any] | None:
        # Published in the log is not yet on the broker (write-ahead: the log comes
        # first; a SIGKILL in between is resume's job, see _reconcile_desired). Kill
        # once every host of batch 2 accepted its desired state.
        r = rollout_doc(fleet)
        if not r or "0" not in r.get("batch_done", {}):
            return None
        started = [h for h in HOSTS[5:10] if r["hosts"][h]["status"] == "published"
                   and accepts(fleet, h)]
        return r if len(started) == 5 else None

    r = wait_for(second_batch_sent, timeout=30, interval=0.05, what="batch 2 to start")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    rid = r["id"]
    assert r["status"] == "running"
    # while no controller runs, batch 2 finishes; the broker keeps its results
    sent = [h for h in HOSTS[5:10] if r["hosts"][h]["status"] == "published"]
    wait_for(lambda: all(results(fleet, h) == [(rid, "succeeded")] for h in sent),
             timeout=20, what="batch 2 to finish without a controller")
    rc, out = fleet.fleetctl_json("rollout", "resume", rid, timeout=90)
    assert rc == 0, out
    assert out["rollout"] == rid and out["status"] == "succeeded" and out["succeeded"] == 20
    for h in HOSTS:
        assert accepts(fleet, h) == [(rid, 1)], (h, fleet.journal(h))
    rows = status_rows(fleet)
    assert all(rows[h]["generation"] == 1 and rows[h]["system"] == SYSTEM for h in HOSTS)
    rc, listed = fleet.fleetctl_json("rollouts")
    assert [(x["id"], x["status"]) for x in listed] == [(rid, "succeeded")]
    assert listed[0]["counts"]["succeeded"] == 20
    # resuming a finished rollout is an input error, not a second run
    one_line_error(fleet.fleetctl("rollout", "resume", rid), 2, "already finished")


def test_confirm_batches_continue_then_abort_from_another_terminal(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS)
    proc = start_deploy(fleet, "@fleet", "--system", SYSTEM, "--batch", "7",
                        "--confirm-batches", "--timeout", "60")

    def awaiting(batch: int) -> dict[str, Any] | None:
        r = rollout_doc(fleet)
        return r if r and r.get("awaiting_batch") == batch else None

    rid = wait_for(lambda: awaiting(1), timeout=30, what="the wait before batch 2")["id"]
    assert all(rollout_doc(fleet, rid)["hosts"][h]["result"] == "succeeded"
               for h in HOSTS[:7])
    assert all(rollout_doc(fleet, rid)["hosts"][h]["status"] == "pending" for h in HOSTS[7:])
    rc, cont = fleet.fleetctl_json("rollout", "continue", rid)
    assert rc == 0 and cont == {"rollout": rid, "batch": 2, "batches": 3}
    wait_for(lambda: awaiting(2), timeout=30, what="the wait before batch 3")
    rc, ab = fleet.fleetctl_json("rollout", "abort", rid[:12])  # a unique prefix works
    assert rc == 0 and ab["rollout"] == rid and ab["driver_running"] is True
    rc, out = finish(proc)
    assert rc == 1 and out["status"] == "aborted"
    assert out["succeeded"] == 14 and out["not_started"] == 6
    assert all(accepts(fleet, h) == [] for h in HOSTS[14:])
    r = rollout_doc(fleet, rid)
    assert r["continued"] == [1] and r["abort_reason"].startswith("aborted by")
    one_line_error(fleet.fleetctl("rollout", "abort", rid), 2, "already finished")
    one_line_error(fleet.fleetctl("rollout", "continue", rid), 2, "already finished")


def test_watch_streams_json_lines_while_a_shared_subscription_driver_runs(
        make_fleet: Any, tmp_path: Path) -> None:
    fleet = fleet20(make_fleet)
    # a fetch that outlasts the agent's 1 s hold, so its Progress is sent (a quicker
    # deploy sends only Ack and Result, by design of client/report/reporter.py)
    fleet.start_simulated(HOSTS, "--sim-fetch-delay", "1.5")
    proc = start_deploy(fleet, "@fleet", "--system", SYSTEM, "--batch", "10",
                        "--share-group", "controllers", "--timeout", "60")
    rid = wait_for(lambda: rollout_doc(fleet).get("id"), timeout=20, what="the rollout")
    w = fleet.fleetctl("watch", rid, "--json", "--timeout", "60")
    rc, out = finish(proc)
    assert rc == 0 and out["status"] == "succeeded" and out["succeeded"] == 20
    assert w.returncode == 0, w.stderr
    records = [json.loads(ln) for ln in w.stdout.splitlines() if ln.strip()]
    hosts = [x for x in records if x["type"] == "host"]
    assert records[-1]["type"] == "end" and records[-1]["status"] == "succeeded"
    assert records[-1]["succeeded"] == 20 and records[-1]["watch_timeout"] is False
    assert {x["host"] for x in hosts} == set(HOSTS)
    last = {x["host"]: x for x in hosts}
    assert all(x["result"] == "succeeded" and x["deployment_id"] == rid for x in last.values())
    # the second batch was seen starting: some host moved through several phases
    assert max(sum(1 for x in hosts if x["host"] == h) for h in HOSTS[10:]) >= 2
    # a terminal without the controller's state dir learns the rollout from the broker
    env_other = {"FLEET_STATE_DIR": str(tmp_path / "elsewhere")}
    other = subprocess.run([sys.executable, "-m", "controller", "watch", rid, "--json",
                            "--timeout", "20"], capture_output=True, text=True,
                           env={**fleet.env(), **env_other}, timeout=60)
    assert other.returncode == 0, other.stderr
    end = json.loads(other.stdout.splitlines()[-1])
    assert end["status"] == "succeeded" and end["succeeded"] == 20
    assert not (tmp_path / "elsewhere").exists()  # watching never writes


def test_no_wait_then_resume_and_state_commands(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS)
    rc, pub = fleet.fleetctl_json("deploy", "@fleet", "--system", SYSTEM, "--batch", "10",
                                  "--no-wait")
    assert rc == 0 and pub["status"] == "published" and pub["hosts"] == HOSTS[:10]
    rid = pub["rollout"]
    rc, out = fleet.fleetctl_json("rollout", "resume", rid)
    assert rc == 0 and out["status"] == "succeeded" and out["succeeded"] == 20
    assert all(accepts(fleet, h) == [(rid, 1)] for h in HOSTS)
    # state show: the resolved document; compaction keeps it, appends continue
    r = fleet.fleetctl("state", "show", "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["_type"] == "flotilla-controller-state"
    assert doc["rollouts"][rid]["status"] == "succeeded"
    assert doc["hosts"]["h01"]["generation"] == 1
    rc, comp = fleet.fleetctl_json("state", "compact")
    assert rc == 0 and comp["entries_before"] > 1 and comp["entries_after"] == 1
    assert json.loads(fleet.fleetctl("state", "show", "--json").stdout) == doc
    rc, out2 = fleet.fleetctl_json("deploy", "h01", "--system", SYSTEM + "-2")
    assert rc == 0 and accepts(fleet, "h01")[-1] == (out2["rollout"], 2)
    rc, listed = fleet.fleetctl_json("rollouts")
    assert [x["id"] for x in listed] == [rid, out2["rollout"]]
    assert set(listed[0]) >= {"id", "selector", "system", "status", "counts"}
    assert listed[0]["selector"] == "@fleet" and listed[0]["system"] == SYSTEM
    text = fleet.fleetctl("rollouts")
    assert text.returncode == 0 and rid in text.stdout
    show = fleet.fleetctl("rollout", "show", rid)
    assert show.returncode == 0 and "h20" in show.stdout


def test_rollout_commands_fail_with_one_line(make_fleet: Any, tmp_path: Path) -> None:
    from controller.mqtt.broker import free_port
    fleet = fleet20(make_fleet)
    one_line_error(fleet.fleetctl("rollout", "show", "r-nope"), 2, "no controller state")
    one_line_error(fleet.fleetctl("state", "show"), 2, "no controller state")
    rc, out = fleet.fleetctl_json("deploy", "h01", "--system", SYSTEM, "--no-wait")
    assert rc == 0
    one_line_error(fleet.fleetctl("rollout", "show", "r-nope"), 2, "unknown rollout")
    one_line_error(fleet.fleetctl("rollout", "continue", out["rollout"]), 2,
                   "--confirm-batches")
    one_line_error(fleet.fleetctl("watch", "--timeout", "0"), 2, "--timeout")
    one_line_error(fleet.fleetctl("deploy", "@fleet", "--system", SYSTEM, "--batch", "0"),
                   2, "--batch")
    fleet.inventory.write_text(fleet.inventory.read_text() + '\n[rollout]\ncanary = "x"\n')
    # an inventory error names the inventory key, not a command-line flag
    one_line_error(fleet.fleetctl("deploy", "@fleet", "--system", SYSTEM), 2,
                   "[rollout] canary")
    # corrupt log: one line, exit 2
    log = fleet.controller_dir / "state.jsonl"
    log.write_text(log.read_text() + "{garbage\n" + log.read_text().splitlines()[-1] + "\n")
    one_line_error(fleet.fleetctl("rollouts"), 2, "corrupt")
    log.write_text("")
    # broker down: exit 3 for every command that talks to it
    fleet.broker_url = f"mqtt://127.0.0.1:{free_port()}"
    one_line_error(fleet.fleetctl("watch", "r-x", "--timeout", "5", "--connect-timeout", "1"),
                   3, "cannot reach the MQTT broker")


async def retained_desired(fleet: Fleet, hosts: list[str]) -> dict[str, Any]:
    """The retained desired state per host (decoded), read to the end."""
    from controller.mqtt.connection import connect, read_retained
    from protocol.broker import BrokerCluster
    from protocol.codec import decode
    from protocol.models import Desired
    from protocol.topics import Topics
    t = Topics(fleet.prefix)
    async with connect(BrokerCluster.parse(fleet.broker_url, fleet.mqtt_version)) as client:
        messages = await read_retained(client, t, [t.all_hosts("desired")])
    out: dict[str, Any] = {}
    for m in messages:
        host, _ = t.parse(str(m.topic))
        payload = m.payload if isinstance(m.payload, bytes) else b""
        if host in hosts and payload:
            out[host] = decode(payload, expect=(Desired,))
    return out


async def test_abort_withdraws_desired_states_nobody_acknowledged(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    online, offline = HOSTS[:5], HOSTS[5:10]
    fleet.start_simulated(online, "--sim-fetch-delay", "0.3")
    rc, out = fleet.fleetctl_json("deploy", "@fleet", "--system", FAILING, "--batch", "10",
                                  "--max-failures", "0", "--timeout", "60")
    rid = out["rollout"]
    assert rc == 1 and out["status"] == "aborted"
    assert {out["hosts"][h] for h in online} == {"rolled_back"}
    assert {out["hosts"][h] for h in offline} == {"cancelled"}
    assert {out["hosts"][h] for h in HOSTS[10:]} == {None}
    assert out["not_started"] == 15 and out["failed"] == 5
    retained = await retained_desired(fleet, HOSTS)
    assert sorted(retained) == online  # the offline hosts' desired states were withdrawn
    assert all(d.deployment_id == rid for d in retained.values())
    # an offline host coming back finds nothing to do
    fleet.start_simulated(offline[:1])
    wait_online(fleet, offline[:1], timeout=20)
    assert accepts(fleet, offline[0]) == []


def test_resume_republishes_a_desired_the_broker_never_got(make_fleet: Any) -> None:
    """The controller died after the write-ahead log entry, before the publish."""
    from controller.rollout.driver import DeployRequest
    from controller.state import store
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS[:3])
    req = DeployRequest(selector="h01,h02,h03", hosts=HOSTS[:3], system=SYSTEM, timeout=60)
    log = EventLog(fleet.controller_dir)
    with log.transaction() as txn:
        txn.add("rollout-created", store.create_rollout(
            txn.doc, "r-crashed", req.selector, SYSTEM, "switch", req.policy_record(),
            [HOSTS[:3]]))
    with log.transaction() as txn:
        txn.add("host-started", store.start_host(txn.doc, "r-crashed", "h01", 1)[2])
    rc, out = fleet.fleetctl_json("rollout", "resume", "r-crashed")
    assert rc == 0 and out["status"] == "succeeded" and out["succeeded"] == 3, out
    assert [accepts(fleet, h) for h in HOSTS[:3]] == [[("r-crashed", 1)]] * 3


def test_confirm_batches_interactive_yes_on_a_terminal(make_fleet: Any) -> None:
    import pexpect
    fleet = fleet20(make_fleet)
    fleet.start_simulated(HOSTS)
    child = pexpect.spawn(sys.executable, ["-m", "controller", "deploy", "@fleet", "--system",
                                           SYSTEM, "--batch", "10", "--confirm-batches",
                                           "--timeout", "60"],
                          env=fleet.env(), encoding="utf-8", timeout=30,
                          dimensions=(50, 160))
    child.expect(r"start batch 2/2 \(10 hosts\)\? \[y/n\]")
    r = rollout_doc(fleet)
    assert r["awaiting_batch"] == 1 and all(r["hosts"][h]["status"] == "pending"
                                            for h in HOSTS[10:])
    child.sendline("y")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    r = rollout_doc(fleet, r["id"])
    assert r["status"] == "succeeded" and r["continued"] == [1]
    # `fleetctl watch` on a terminal renders the finished rollout and exits 0
    watch = pexpect.spawn(sys.executable, ["-m", "controller", "watch", r["id"]],
                          env=fleet.env(), encoding="utf-8", timeout=30, dimensions=(50, 160))
    watch.expect("rollout succeeded")
    watch.expect(pexpect.EOF)
    watch.close()
    assert watch.exitstatus == 0


async def test_offline_skip_never_sends_to_offline_hosts(make_fleet: Any) -> None:
    fleet = fleet20(make_fleet)
    online, offline = HOSTS[:15], HOSTS[15:]
    fleet.start_simulated(online)
    wait_online(fleet, online, timeout=20)
    rc, out = fleet.fleetctl_json("deploy", "@fleet", "--system", SYSTEM, "--offline", "skip",
                                  "--batch", "10", "--timeout", "60")
    assert rc == 0 and out["status"] == "succeeded", out
    assert out["succeeded"] == 15 and out["not_started"] == 5
    assert {out["hosts"][h] for h in offline} == {"skipped"}
    assert sorted(await retained_desired(fleet, HOSTS)) == online


async def test_a_driver_whose_catch_up_outlasts_the_mqtt_timeout_still_starts(
        make_fleet: Any, broker: Any, monkeypatch: Any) -> None:
    """At 10,000 hosts the retained online flags and states take longer to handle than
    aiomqtt's per-operation timeout (5 s): the driver's catch-up must not time out
    (it did: 'Operation timed out' from the SUBACK waiting behind the retained
    messages). Here 2,500 retained flags of other hosts, each handled slowly, stand in
    for a large fleet on a busy machine."""
    import time as _time

    import aiomqtt

    from controller.rollout.driver import ControllerContext, DeployRequest, RolloutDriver
    from controller.state.keys import load_key
    from protocol.broker import BrokerCluster
    from protocol.topics import Topics

    fleet = make_fleet({"c1": ["x"]})
    fleet.start_simulated(["c1"])
    async with aiomqtt.Client("127.0.0.1", broker.port, max_queued_outgoing_messages=0,
                              max_inflight_messages=500) as client:
        for i in range(2500):
            await client.publish(f"{fleet.prefix}/host/other{i:04d}/online", b"online",
                                 qos=1, retain=True)
    handle = RolloutDriver._on_message

    def busy(self: RolloutDriver, message: aiomqtt.Message) -> None:
        _time.sleep(0.0025)  # a busy controller: 2,500 messages take ~6 s to handle
        handle(self, message)

    monkeypatch.setattr(RolloutDriver, "_on_message", busy)
    ctx = ControllerContext(broker=BrokerCluster.parse(broker.url), topics=Topics(fleet.prefix),
                            state_dir=fleet.controller_dir, key=load_key(fleet.controller_dir))
    driver = RolloutDriver(ctx, DeployRequest(selector="c1", hosts=["c1"], system=SYSTEM,
                                              timeout=60))
    outcome = await driver.run()
    assert outcome.status == "succeeded", outcome.summary()
