"""Issue 14: the output of a host's programs is kept, sent in batches and readable later."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from client.report.deplog import DeploymentLog, read_log
from controller.commands.logs import unseen
from controller.state.logs import LineFollower, LogRecord, LogStore, read_lines
from protocol.models import Log, LogLine, carried_lines
from protocol.rotlog import Follower, RotatingFile
from tests.helpers import Listener
from tests.stepsys import script


def failing_migration_system(root: Path, lines: int = 60) -> Path:
    """A toplevel whose `db` migration prints progress on stdout, then fails on stderr."""
    top = root / "sys-migrate"
    (top / "bin").mkdir(parents=True)
    (top / "flotilla").mkdir()
    migrate = script(top / "bin" / "migrate-db",
                     f'for i in $(seq 1 {lines}); do echo "step $i: converting tables"; done\n'
                     'echo "ERROR: relation users has no column email" >&2\nexit 3\n')
    check = script(top / "bin" / "check-db", 'echo "checking db" >&2\n'
                   'echo \'{"items": [{"id": "v", "severity": "warning", "message": "upgrade", '
                   '"choices": [{"id": "go"}], "default": "go"}]}\'\n')
    steps = [{"name": "db", "check": check, "paths": [str(root / "data")],
              "migrations": {"go": migrate}}]
    (root / "data").mkdir(exist_ok=True)
    (top / "flotilla" / "steps.json").write_text(json.dumps({"steps": steps}))
    return top


async def test_failed_migration_output_is_kept_and_shown_after_the_fact(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet({"pg1": ["db"]})
    top = failing_migration_system(tmp_path, lines=60)
    fleet.start_simulated(["pg1"])
    async with Listener(fleet.broker_url, f"{fleet.prefix}/host/pg1/events") as events:
        r = await asyncio.to_thread(fleet.fleetctl, "deploy", "pg1", "--system", str(top),
                                    "--choose", "db.v=go", "--on-step-failure", "rollback",
                                    "--json")
        await events.wait(lambda e: e.__class__.__name__ == "Result")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["hosts"]["pg1"] == "rolled_back"
    # deploy --json carries the failed host's last lines, the program's stderr among them
    assert any("relation users has no column email" in ln for ln in out["logs"]["pg1"]), out
    # batched: 60+ lines in a handful of events (Log, or riding on Progress and Result),
    # never one message per line
    batches = [e for e in events.events if carried_lines(e)[0]]
    sent = [ln.text for e in batches for ln in carried_lines(e)[0]]
    assert "step 60: converting tables" in sent and "checking db" in sent
    assert 1 <= len(batches) <= 10, len(batches)
    # after the fact, from the controller's store (not inside state.jsonl)
    logs = fleet.fleetctl("logs", "pg1")
    assert logs.returncode == 0, logs.stderr
    assert "[migrate:db] step 1: converting tables" in logs.stdout
    assert "[migrate:db] ! ERROR: relation users has no column email" in logs.stdout
    assert "[check:db] ! checking db" in logs.stdout
    assert "converting tables" not in (fleet.controller_dir / "state.jsonl").read_text()
    rid = out["rollout"]
    rc, js = fleet.fleetctl_json("logs", "pg1", "--deployment", rid, "--lines", "2")
    assert rc == 0 and js["rollout"] == rid and len(js["lines"]) == 2, js
    assert js["lines"][-1]["source"] == "rollback", js
    # the agent keeps its own copy per deployment
    kept = read_log(fleet.root / "agents" / "pg1", rid)
    assert "step 30: converting tables" in [ln.text for ln in kept]
    r2 = fleet.fleetctl("logs", "pg9")
    assert r2.returncode == 2 and "pg9" in r2.stderr and "Traceback" not in r2.stderr


async def test_agent_log_is_bounded_rotated_and_rate_limited(tmp_path: Path) -> None:
    sent: list[tuple[int, int]] = []

    async def send(lines: list[LogLine], dropped: int) -> None:
        sent.append((len(lines), dropped))

    for i in range(12):  # only the last deployments' logs are kept
        DeploymentLog(tmp_path, f"old{i}", send, keep=10).line("stdout", "x", "y")
    assert len(list((tmp_path / "logs").glob("*.log"))) == 10
    dlog = DeploymentLog(tmp_path, "d1", send, max_bytes=20_000, interval=0.05, max_buffer=300)
    dlog.start()
    for i in range(1000):
        dlog.line("stdout", "migrate:db", f"line {i:04d} " + "x" * 40)
    await dlog.close()
    kept = read_log(tmp_path, "d1")
    assert kept[-1].text.startswith("line 0999")
    assert (tmp_path / "logs" / "d1.log.1").exists()
    assert sum((tmp_path / "logs" / n).stat().st_size for n in ("d1.log", "d1.log.1")) <= 40_000
    # a burst beyond the buffer is sent as few events, and the rest counted as dropped
    assert sent[-1] == (300, 700), sent


def test_controller_store_dedupes_and_rotates(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=5_000)
    for seq in (1, 1, 2):  # a QoS 1 redelivery is stored once
        store.append(Log(host="h1", deployment_id="r1.2", seq=seq, time=1.0,
                         lines=[LogLine(time=1.0, text=f"{seq}-{i}" + "z" * 50)
                                for i in range(40)]))
    lines = read_lines(tmp_path, "r1", "h1")
    assert len(lines) == 80 and lines[0].text.startswith("1-0z") and lines[-1].seq == 2
    assert read_lines(tmp_path, "r1", "h1", "r1.3") == []
    assert (tmp_path / "logs" / "r1" / "h1.jsonl.1").exists()


@pytest.mark.parametrize("reads_per_rotation", [1, 3])
def test_a_follower_gets_every_line_once_in_order_across_rotations(
        tmp_path: Path, reads_per_rotation: int) -> None:
    """`logs --follow` reads what the driver appended since its last read (not the
    whole file again per event): every line once, also when the file was rotated to
    `.1` between two reads; the first read is everything kept."""
    path = tmp_path / "h1.jsonl"
    writer = RotatingFile(path, max_bytes=1_000, keep_open=False)
    follower = Follower(path)
    assert follower.read() == []  # no file yet
    written: list[str] = []
    got: list[str] = []
    for i in range(200):  # 20 bytes a line: a rotation every ~50 lines
        line = f"line {i:04d} " + "x" * 9
        writer.append((line + "\n").encode())
        written.append(line)
        if i % (50 // reads_per_rotation) == 0:
            got += follower.read()
    got += follower.read()
    assert (tmp_path / "h1.jsonl.1").exists()
    assert got == written
    assert follower.read() == []
    # a late follower starts with what is kept: the rotated part, then the file
    kept = Follower(path).read()
    assert 50 < len(kept) < len(written) and kept == written[-len(kept):]


def test_a_follower_keeps_a_line_being_written_for_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one\ntw")
    follower = Follower(path)
    assert follower.read() == ["one"]
    with path.open("ab") as fh:
        fh.write(b"o\nthree\n")
    assert follower.read() == ["two", "three"]


def test_the_controllers_line_follower_returns_only_new_records(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    follower = LineFollower(tmp_path, "r1", "h1", "r1")
    store.append(Log(host="h1", deployment_id="r1", seq=1, time=1.0,
                     lines=[LogLine(time=1.0, text="a")]))
    store.append(Log(host="h1", deployment_id="r1.2", seq=1, time=1.0,
                     lines=[LogLine(time=1.0, text="other attempt")]))
    assert [r.text for r in follower.read()] == ["a"]
    store.append(Log(host="h1", deployment_id="r1", seq=2, time=2.0,
                     lines=[LogLine(time=2.0, text="b"), LogLine(time=2.0, text="c")]))
    assert [(r.seq, r.text) for r in follower.read()] == [(2, "b"), (2, "c")]
    assert follower.read() == []


def rec(seq: int, text: str, dep: str = "r1") -> LogRecord:
    return LogRecord(dep, seq, 0.0, "stdout", "migrate:db", text)


@pytest.mark.parametrize(("records", "seen", "after", "before", "want"), [
    # the event carrying "a" was sent before `logs --follow` subscribed and stored only
    # after it read the store: printed from the store before the live event 5
    ([rec(3, "a"), rec(3, "a2")], set(), -1, 5, ["a", "a2"]),
    ([rec(3, "a"), rec(5, "b")], set(), -1, 5, ["a"]),           # not the live one itself
    ([rec(3, "a"), rec(4, "b")], {("r1", 3)}, -1, 5, ["b"]),     # printed once only
    ([rec(1, "old"), rec(3, "a")], {("r1", 3)}, 3, 9, []),       # older than the first read
    ([rec(3, "a"), rec(6, "c")], set(), -1, None, ["a", "c"]),   # at the end: all of it
    ([rec(3, "a", "r1.2")], {("r1", 3)}, -1, 5, ["a"]),          # another attempt's event
])
def test_follow_catches_up_on_lines_the_driver_stored_late(
        records: list[LogRecord], seen: set[tuple[str, int]], after: int, before: int | None,
        want: list[str]) -> None:
    assert [r.text for r in unseen(records, seen, after, before)] == want


def test_logs_follow_prints_live_lines_until_the_deployment_ends(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    from tests.helpers import deploy_bg, finish, wait_for
    fleet = make_fleet({"pg1": ["db"]})
    top = tmp_path / "sys-slow"
    (top / "bin").mkdir(parents=True)
    (top / "flotilla").mkdir()
    gate = tmp_path / "gate"
    migrate = script(top / "bin" / "migrate", 'echo "copying rows"\n'
                     f'while [ ! -e {gate} ]; do sleep 0.1; done\necho "all rows copied"\n')
    (top / "flotilla" / "steps.json").write_text(json.dumps(
        {"steps": [{"name": "db", "migrations": {"*": migrate}}]}))
    fleet.start_simulated(["pg1"])
    proc = deploy_bg(fleet, "pg1", "--system", str(top), "--timeout", "60")
    wait_for(lambda: (fleet.controller_dir / "state.jsonl").exists()
             and "pg1" in (fleet.controller_dir / "state.jsonl").read_text(),
             what="the rollout to start")
    import subprocess
    import sys
    follower = subprocess.Popen([sys.executable, "-m", "controller", "logs", "pg1", "--follow"],
                                stdout=subprocess.PIPE, text=True, env=fleet.env())
    wait_for(lambda: any(p.name.endswith(".jsonl") for p in
                         (fleet.controller_dir / "logs").rglob("*.jsonl"))
             and "copying rows" in "".join(p.read_text() for p in
                                           (fleet.controller_dir / "logs").rglob("*.jsonl")),
             what="the first line stored")
    gate.touch()
    out, _ = follower.communicate(timeout=60)  # ends by itself with the deployment
    assert follower.returncode == 0
    assert "[migrate:db] copying rows" in out and "[migrate:db] all rows copied" in out, out
    rc, summary = finish(proc)
    assert rc == 0 and summary["hosts"]["pg1"] == "succeeded"


async def test_lines_that_arrive_after_the_retained_outcome_are_stored(
        broker, controller_dir: Path, prefix: str) -> None:  # type: ignore[no-untyped-def]
    """A driver that (re)connects catches up from the hosts' retained states; on a NATS
    cluster the events its session queued meanwhile can arrive after them. It used to
    finish on the retained outcome at once and end its session, and the stored log
    (`fleetctl logs`) lacked the host's last lines (seen 1 run in 4 in the NATS
    watch/logs test). Here a rollout is published (`--no-wait`), the host finishes and
    retains its outcome, and only once the resumed driver has caught up on it do the
    host's last events arrive: the driver stores them before it ends."""
    import time

    from controller.rollout.driver import ControllerContext, DeployRequest, RolloutDriver
    from controller.state.keys import load_key
    from protocol.broker import BrokerCluster
    from protocol.codec import decode, encode
    from protocol.models import Desired, HostState, Result
    from protocol.topics import Topics
    from tests.helpers import mqtt_client

    topics = Topics(prefix)
    system = "/nix/store/dddd-nixos-system-late-lines"
    ctx = ControllerContext(broker=BrokerCluster.parse(broker.url), topics=topics,
                            state_dir=controller_dir, key=load_key(controller_dir))
    first = RolloutDriver(ctx, DeployRequest(selector="h1", hosts=["h1"], system=system,
                                             timeout=30))
    assert (await first.run(wait=False)).status == "published"
    async with mqtt_client(broker.url) as host:
        await host.subscribe(topics.desired("h1"), qos=1)
        async for m in host.messages:
            d = decode(bytes(m.payload), expect=(Desired,))  # type: ignore[arg-type]
            break
        ids = {"host": "h1", "deployment_id": d.deployment_id, "generation": d.generation}
        now = time.time()
        await host.publish(topics.state("h1"), encode(HostState(
            host="h1", system=system, generation=d.generation, phase="done",
            deployment_id=d.deployment_id, last_result="succeeded", updated_at=now)),
            qos=1, retain=True)
        resumed = RolloutDriver.from_log(ctx, first.rollout_id)
        run = asyncio.create_task(resumed.run())
        deadline = time.monotonic() + 20
        while not resumed.views["h1"].done:  # caught up on the retained outcome
            assert time.monotonic() < deadline and not run.done(), "no catch-up"
            await asyncio.sleep(0.01)
        await host.publish(topics.events("h1"), encode(Log(**ids, seq=1, time=now, lines=[
            LogLine(time=now, source="switch", text="activating the new system")])), qos=1)
        await host.publish(topics.events("h1"), encode(Result(**ids, seq=2, time=now,
            status="succeeded", lines=[LogLine(time=now, text="done")])), qos=1)
        outcome = await asyncio.wait_for(run, 30)
    assert outcome.status == "succeeded", outcome.summary()
    texts = [r.text for r in read_lines(controller_dir, first.rollout_id, "h1")]
    assert texts == ["activating the new system", "done"], texts


NOW = 1_800_000_000.0
FOLLOW_CASES = [
    # (rollout status, host result, finished seconds ago, ends?)
    ("running", None, None, False),           # still deploying
    ("running", "succeeded", 0.5, False),     # its last lines may still be on their way
    ("running", "succeeded", 5.0, True),      # LATE_LINES_S passed: the store has them
    ("running", "failed", 60.0, True),
    ("succeeded", "succeeded", 0.5, True),    # the driver ended: it stored all it got
    ("aborted", None, None, True),            # the host never got to run
    ("running", "succeeded", "garbage", True),  # an odd record does not keep it waiting
]


@pytest.mark.parametrize(("status", "result", "ago", "ends"), FOLLOW_CASES)
def test_logs_follow_ends_without_the_result_only_when_no_line_can_come(
        status: str, result: str | None, ago: object, ends: bool) -> None:
    """`logs --follow` that missed the host's Result (it was away) ends from the event
    log; a host finished a moment ago may still have lines on their way to the driver."""
    from controller.commands.logs import follow_ends
    finished = NOW - ago if isinstance(ago, float) else ago
    rollout = {"status": status, "hosts": {"h1": {"result": result, "finished": finished}}}
    assert follow_ends(rollout, "h1", NOW) is ends
