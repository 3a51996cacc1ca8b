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

import pytest

from tests.helpers import Fleet, wait_for
from tests.stepsys import asking_system


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
    top = asking_system(tmp_path)
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


def test_answer_without_a_prompt_id_answers_the_host_s_open_prompt(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    """`fleetctl answer db1 postgresql.major=pg_upgrade` took the answer for the prompt
    id and said "give at least one STEP.ITEM=CHOICE"; a host has one open prompt at a
    time, as `approve` knows."""
    fleet = make_fleet({"pg1": ["db"]})
    top = asking_system(tmp_path)
    fleet.start_simulated(["pg1"])
    r = fleet.fleetctl("answer", "pg1", "db.major=upgrade")
    assert r.returncode == 2 and "pg1 has no open prompt" in r.stderr, r.stdout + r.stderr
    proc, lines = popen_lines(fleet, "deploy", "pg1", "--system", str(top), "--timeout", "60")
    seen: list[str] = []
    try:
        next_line(lines, lambda ln: "fleetctl answer" in ln, seen)
        r = fleet.fleetctl("answer", "pg1", "db.major=upgrade")
        assert r.returncode == 0 and "accepted" in r.stdout, r.stdout + r.stderr
        next_line(lines, lambda ln: "pg1 succeeded" in ln, seen)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _demo_with_agents_online() -> tuple[subprocess.Popen[str], list[int]]:
    """A `fleetctl demo` of two hosts, once its agents are online; its two children (the
    broker and the agents' process)."""
    demo = subprocess.Popen([sys.executable, "-m", "controller", "demo", "--hosts", "2",
                             "--delay", "0.5", "--seed", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert demo.stdout is not None
    for line in demo.stdout:
        if "agents online" in line:
            break
    children = [int(c) for c in Path(f"/proc/{demo.pid}/task/{demo.pid}/children")
                .read_text().split()]
    assert len(children) == 2 and all(_alive(c) for c in children), children
    return demo, children


def test_sigterm_is_an_interrupt_a_deploy_can_resume_from_and_a_demo_cleans_up_after(  # type: ignore[no-untyped-def]
        make_fleet, tmp_path: Path) -> None:
    """SIGTERM (systemd, `timeout`, a CI runner) killed fleetctl outright: a demo left its
    Mosquitto and simulated agents running, a deploy printed nothing about its rollout."""
    import signal
    fleet = make_fleet({"pg1": ["db"]})
    top = asking_system(tmp_path)
    fleet.start_simulated(["pg1"])
    proc, lines = popen_lines(fleet, "deploy", "pg1", "--system", str(top), "--timeout", "60")
    try:
        next_line(lines, lambda ln: "fleetctl answer" in ln, [])  # waiting for a person
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert "fleetctl rollout resume" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
    rollouts = json.loads(fleet.fleetctl("rollouts", "--json").stdout)
    assert [r["status"] for r in rollouts] == ["running"]  # left to be resumed, not failed

    demo, children = _demo_with_agents_online()
    try:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=30) == 143
        assert "Traceback" not in demo.stderr.read()  # type: ignore[union-attr]
        wait_for(lambda: not any(_alive(c) for c in children), timeout=15,
                 what="the demo's broker and agents to stop")
    finally:
        if demo.poll() is None:
            demo.kill()


def test_a_killed_demo_leaves_nothing_running() -> None:
    """SIGKILL (OOM killer, `timeout -s KILL`) leaves no clean-up to run: the demo's
    broker and agents kept running, each demo adding two processes for good."""
    import signal
    demo, children = _demo_with_agents_online()
    try:
        demo.send_signal(signal.SIGKILL)
        demo.wait(timeout=10)
        wait_for(lambda: not any(_alive(c) for c in children), timeout=15,
                 what="the killed demo's broker and agents to stop")
    finally:
        if demo.poll() is None:
            demo.kill()


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



# -- pure: help, inventory, prompts ---------------------------------------------------------

def _options(parser):  # type: ignore[no-untyped-def]
    import argparse
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                for path, opt in _options(sp):
                    yield [name, *path], opt
        elif a.option_strings and a.help is not argparse.SUPPRESS:
            yield [], a


def test_every_option_has_help_that_shows_its_default(capsys) -> None:  # type: ignore[no-untyped-def]
    import argparse

    import pytest

    from client.cli import build_parser as agent_parser
    from controller.cli import COMMON_DEFAULTS, HelpFormatter
    from controller.cli import build_parser as fleetctl_parser
    for build, fmt in ((fleetctl_parser, HelpFormatter),
                       (agent_parser, argparse.ArgumentDefaultsHelpFormatter)):
        parser = build()
        for path, o in _options(parser):
            if isinstance(o, argparse._HelpAction | argparse._VersionAction):
                continue
            assert o.help, (path, o.option_strings)
            default = COMMON_DEFAULTS.get(o.dest, o.default) \
                if o.default is argparse.SUPPRESS else o.default
            if default not in (None, False):
                shown = fmt("x")._get_help_string(o)  # type: ignore[attr-defined]
                assert "default" in shown, (path, o.option_strings, shown)
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--version"])
        assert exc.value.code == 0 and "0.1" in capsys.readouterr().out
    demo = next(sp for a in fleetctl_parser()._actions
                if isinstance(a, argparse._SubParsersAction) for n, sp in a.choices.items()
                if n == "demo")
    text = " ".join(demo.format_help().split())
    assert "canary" in text and "(default: 12)" in text and "rolled back" in text


def fleetctl_main(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """The real `fleetctl` entry point, in-process (fast: no interpreter start)."""
    from controller.cli import main
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_global_options_before_and_after_the_command(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env_args = ["--state-dir", str(tmp_path)]
    for argv in (["--json", "rollouts", *env_args], ["rollouts", "--json", *env_args],
                 ["--json", *env_args, "rollouts"], ["-v", "--json", "rollouts", *env_args]):
        code, out, err = fleetctl_main(capsys, *argv)
        assert code == 0 and json.loads(out) == [], (argv, out, err)


def test_an_empty_or_non_directory_state_dir_is_refused(capsys, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        monkeypatch) -> None:
    """`FLEET_STATE_DIR=` and `--state-dir ''` were the current directory; a regular
    file listed "no rollouts recorded yet" (exit 0). Each is one line, exit 2, and
    nothing is written anywhere."""
    a_file = tmp_path / "state"
    a_file.write_text("not a directory\n")
    (tmp_path / "fleet.toml").write_text('[hosts.w1]\ntags = ["web"]\n')
    monkeypatch.chdir(tmp_path)  # where an empty state dir would have been
    monkeypatch.setenv("FLEET_INVENTORY", str(tmp_path / "fleet.toml"))
    deploy = ("deploy", "w1", "--system", "/nix/store/x-sys", "--broker", "mqtt://127.0.0.1:9")
    cases = [
        ({"FLEET_STATE_DIR": ""}, ("rollouts",), "--state-dir (env FLEET_STATE_DIR) is empty"),
        ({}, ("rollouts", "--state-dir", ""), "--state-dir (env FLEET_STATE_DIR) is empty"),
        ({"FLEET_STATE_DIR": ""}, deploy, "--state-dir (env FLEET_STATE_DIR) is empty"),
        ({}, ("rollouts", "--state-dir", str(a_file)), f"{a_file} is not a directory"),
        ({"FLEET_STATE_DIR": str(a_file)}, deploy, f"{a_file} is not a directory"),
        ({"FLEET_STATE_DIR": str(a_file)}, ("keys", "init"), f"{a_file} is not a directory"),
        ({"FLEET_INVENTORY": ""}, (*deploy, "--state-dir", str(tmp_path / "s")),
         "--inventory (env FLEET_INVENTORY) is empty"),
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for env, argv, message in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            code, out, err = fleetctl_main(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, env, err)
        assert out == "" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert a_file.read_text() == "not a directory\n"


def test_a_zero_byte_event_log_is_a_fresh_one_and_takes_the_next_append(  # type: ignore[no-untyped-def]
        capsys, tmp_path: Path) -> None:
    """What a crash between creating state.jsonl and its first fsync leaves: the first
    append always writes index 0 with that fsync, so nothing was committed and nothing
    is lost by reading it as a fresh log; the next append must start it properly."""
    from controller.state import store
    from controller.state.eventlog import DOC_TYPE, EventLog
    (tmp_path / "state.jsonl").write_bytes(b"")
    code, out, err = fleetctl_main(capsys, "rollouts", "--state-dir", str(tmp_path))
    assert code == 0 and out == "no rollouts recorded yet\n", out + err
    log = EventLog(tmp_path)
    log.load()
    log.append("rollout-created", store.create_rollout(
        log.doc, "r1", "@web", "/nix/store/x", "switch", {}, [["w1"]]))
    entries = [json.loads(ln) for ln in log.path.read_text().splitlines()]
    assert [e["index"] for e in entries] == [0, 1]
    doc = EventLog(tmp_path).load()
    assert doc["_type"] == DOC_TYPE and list(doc["rollouts"]) == ["r1"]
    code, out, _ = fleetctl_main(capsys, "rollouts", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["r1"]


def test_inventory_typos_and_bad_tags_are_errors_naming_the_key() -> None:
    import pytest

    from controller.state.inventory import parse_inventory
    from protocol.errors import InputError
    cases = {
        '[hosts.web1]\ntagz = ["web"]\n': "unknown key 'tagz'; did you mean 'tags'",
        '[hosts.web1]\ntags = ["EU"]\n': "hosts.web1.tags: invalid tag 'EU'",
        '[hosts.web1]\ntags = ["web", ""]\n': "empty tag",
        '[rollout]\nbatchsize = 3\n': "[rollout]: unknown key 'batchsize'; did you mean 'batch'",
    }
    for text, message in cases.items():
        with pytest.raises(InputError) as exc:
            parse_inventory(text, "fleet.toml")
        assert message in str(exc.value), (text, str(exc.value))


def test_hosts_add_tags_follow_the_inventory_rules(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for tags, message in (("web,,eu", "empty tag"), ("EU", "invalid tag 'EU'")):
        code, _, err = fleetctl_main(capsys, "hosts", "add", "web1", "--tags", tags,
                                     "--inventory", str(tmp_path / "fleet.toml"),
                                     "--mosquitto-passwd", str(tmp_path / "passwd"),
                                     "--state-dir", str(tmp_path))
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "fleet.toml").exists() and not (tmp_path / "passwd").exists()


def test_prompt_answers_name_the_right_command() -> None:
    from client.ask.prompt_tui import outcome_line
    from controller.commands.steps import answer_command
    row = {"host": "pg1", "prompt_id": "r1.approve", "kind": "approval", "items": []}
    assert answer_command(row) == "fleetctl approve pg1"
    row = {"host": "pg1", "prompt_id": "r1.choose", "kind": "choice",
           "items": [{"step": "db", "id": "major", "choices": [{"id": "a"}, {"id": "b"}]}]}
    assert answer_command(row) == "fleetctl answer pg1 r1.choose db.major=a|b"
    assert outcome_line(True, "accepted") == "accepted"
    assert outcome_line(False, "no open prompt x") == "refused: no open prompt x"


def test_dry_run_resolves_everything_and_touches_nothing(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inv = tmp_path / "fleet.toml"
    inv.write_text("".join(f'[hosts.w{i}]\ntags = ["web"]\n' for i in range(1, 6))
                   + '[rollout]\nbatch = "2"\n')
    base = ["deploy", "@web", "--system", "/nix/store/x", "--inventory", str(inv),
            "--state-dir", str(tmp_path / "state"),
            "--broker", "mqtt://127.0.0.1:9"]  # nothing listens there: contacts nothing
    code, out, err = fleetctl_main(capsys, *base, "--dry-run", "--canary", "1", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [b["hosts"] for b in plan["batches"]] == [["w1"], ["w2", "w3"], ["w4", "w5"]]
    assert plan["batches"][0]["canary"] and plan["systems"]["w5"] == "/nix/store/x"
    assert plan["policy"]["rollout"]["batch"] == "2"
    assert not (tmp_path / "state").exists()
    code, out, _ = fleetctl_main(capsys, *base, "--dry-run")
    assert code == 0 and "batch 2 (2): w3, w4" in out, out
    # an inventory value's error names the inventory key, not a flag
    inv.write_text('[hosts.w1]\ntags = ["web"]\n[rollout]\nbatch = "lots"\n')
    code, _, err = fleetctl_main(capsys, *base, "--dry-run")
    assert code == 2 and "[rollout]" in err and "--batch" not in err, err


# -- with a broker: checks, listings, rollouts nobody drives ---------------------------------

class InProcess:
    """`fleetctl` in this process against a test fleet (no interpreter start per call)."""

    def __init__(self, fleet: Fleet, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
        for k, v in fleet.env().items():
            if k.startswith("FLEET_"):
                monkeypatch.setenv(k, v)
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str]:
        code, out, _ = fleetctl_main(self.capsys, *argv)
        return code, out

    def json(self, *argv: str):  # type: ignore[no-untyped-def]
        code, out = self(*argv, "--json")
        return code, json.loads(out.splitlines()[-1])


def test_a_deploy_names_the_running_rollout_it_takes_hosts_from(  # type: ignore[no-untyped-def]
        make_fleet, monkeypatch, capsys) -> None:
    """Two operators' rollouts crossed unseen: the second took the first's hosts, which
    ended cancelled there, and only `rollout show` of the first said so, afterwards."""
    fleet = make_fleet({"w1": ["web"], "w2": ["web"], "w3": ["db"]})
    fleet.start_simulated(["w1", "w2", "w3"])
    ctl = InProcess(fleet, monkeypatch, capsys)
    _, first = ctl.json("deploy", "w1,w2", "--system", "/nix/store/a-sys", "--no-wait")
    rid = first["rollout"]
    code, out, err = fleetctl_main(capsys, "deploy", "w3", "--system", "/nix/store/b-sys",
                                   "--dry-run", "--json")
    assert code == 0 and json.loads(out)["supersedes"] == {} and "note" not in err, err
    code, out, err = fleetctl_main(capsys, "deploy", "@web", "--system", "/nix/store/b-sys",
                                   "--dry-run", "--json")
    assert code == 0 and json.loads(out)["supersedes"] == {rid: ["w1", "w2"]}, out
    code, out, err = fleetctl_main(capsys, "deploy", "w2", "--system", "/nix/store/b-sys")
    assert code == 0, out + err
    assert f"1 host of running rollout {rid} (w2)" in err and "supersedes" in err, err


def test_check_is_recorded_as_a_check_and_leaves_host_status(  # type: ignore[no-untyped-def]
        make_fleet, monkeypatch, capsys) -> None:
    fleet = make_fleet({"w1": ["web"], "w2": ["web"]})
    agents = fleet.start_simulated(["w1", "w2"])
    ctl = InProcess(fleet, monkeypatch, capsys)
    rc, out = ctl.json("deploy", "@web", "--system", "/nix/store/a-sys")
    assert rc == 0, out
    _, before = ctl.json("hosts", "@web")
    assert [(r["host"], r["tags"], r["result"], r["system"]) for r in before] == [
        ("w1", ["web"], "succeeded", "/nix/store/a-sys"),
        ("w2", ["web"], "succeeded", "/nix/store/a-sys")]
    rc, verdict = ctl.json("deploy", "@web", "--system", "/nix/store/b-sys", "--check")
    assert rc == 0 and verdict["go"] is True, verdict
    _, after = ctl.json("hosts")
    keys = ("host", "phase", "result", "system", "deployment")
    assert [{k: r[k] for k in keys} for r in after] == [{k: r[k] for k in keys} for r in before]
    _, rows = ctl.json("rollouts")
    assert [r["kind"] for r in rows] == ["deploy", "check"] and rows[1]["status"] == "succeeded"
    _, doc = ctl.json("state", "show")
    assert doc["hosts"]["w1"]["deployment_id"] == rows[0]["id"]  # the deploy, not the check
    _, show = ctl("rollout", "show", rows[1]["id"])
    assert "(check)" in show and "(switch)" not in show
    # restarted agents report their last deploy again, not the check
    agents.terminate()
    agents.wait(30)
    import asyncio

    from protocol.topics import Topics
    from tests.helpers import publish, wait_for
    for h in ("w1", "w2"):  # forget the retained states: what the agents say again counts
        asyncio.run(publish(fleet.broker_url, Topics(fleet.prefix).state(h), b"", retain=True))
    fleet.start_simulated(["w1", "w2"])
    wait_for(lambda: all(r["deployment"] for r in ctl.json("hosts")[1]),
             what="the restarted agents' states")
    _, again = ctl.json("hosts")
    assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in before]


def test_rollouts_nobody_drives_are_shown_and_closed(  # type: ignore[no-untyped-def]
        make_fleet, monkeypatch, capsys) -> None:
    import signal
    fleet = make_fleet({"w1": ["web"], "w2": ["web"], "w3": ["web"]})
    fleet.start_simulated(["w1", "w2"])
    ctl = InProcess(fleet, monkeypatch, capsys)
    # --no-wait with every host in one batch: once they all finished, the next command
    # that looks closes the rollout (it stayed `running` forever before)
    rc, out = ctl.json("deploy", "w1,w2", "--system", "/nix/store/a-sys", "--no-wait")
    rid = out["rollout"]
    code, w = ctl("watch", rid, "--timeout", "60")
    assert code == 0 and f"no controller is driving rollout {rid}" in w, w
    _, rows = ctl.json("rollouts")
    assert rows[-1]["status"] == "succeeded", rows
    # watch of a finished rollout: its own run time, the end line once, no broker needed
    code, w = ctl("watch", rid, "--broker", "mqtt://127.0.0.1:9")
    assert code == 0 and w.count("rollout succeeded") == 1 and "succeeded 2" in w, w
    created, finished = rows[-1]["created"], rows[-1]["finished"]
    assert f"in {finished - created:.1f}s" in w, (w, finished - created)
    # Ctrl-C on a deploy that waits for an offline host names the resume command. The
    # deploy gets SIGINT's default disposition, as from a terminal: a suite started in the
    # background (`make test &`) ignores SIGINT, and children inherit that.
    proc = subprocess.Popen([sys.executable, "-m", "controller", "deploy", "w3", "--system",
                             "/nix/store/a-sys"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fleet.env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rid2 = wait_for_rollout(fleet, rid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and f"fleetctl rollout resume {rid2}" in err, err
    _, listing = ctl("rollouts")
    assert "running (no controller)" in listing
    assert f"`fleetctl rollout resume {rid2}`" in listing
    _, detail = ctl.json("rollout", "show", rid2)
    assert detail["status"] == "running" and detail["driven"] is False


def test_watch_ends_a_host_a_newer_rollout_took(  # type: ignore[no-untyped-def]
        make_fleet, monkeypatch, capsys) -> None:
    """A rollout nobody drives whose host another rollout then deployed: that host will
    never report for it again (its agent runs the latest desired state only). `watch`
    used to wait for it for ever; now it ends the host as superseded, as `rollout
    resume` does, and closes the rollout."""
    from tests.helpers import wait_for
    fleet = make_fleet({"w1": ["web"], "w2": ["web"]})
    fleet.start_simulated(["w1"])
    ctl = InProcess(fleet, monkeypatch, capsys)
    # w1 is online: it runs the first rollout, then a second one replaces its state
    _, first = ctl.json("deploy", "w1", "--system", "/nix/store/a-sys", "--no-wait")
    wait_for(lambda: ctl.json("status", "w1")[1][0]["deployment"] == first["rollout"],
             what="w1 to take the first rollout")
    code, _ = ctl("deploy", "w1", "--system", "/nix/store/b-sys")
    assert code == 0
    # w2 is offline: its desired state is replaced before it ever saw the first
    _, third = ctl.json("deploy", "w2", "--system", "/nix/store/a-sys", "--no-wait")
    _, fourth = ctl.json("deploy", "w2", "--system", "/nix/store/b-sys", "--no-wait")
    for old, new, host in ((first, None, "w1"), (third, fourth, "w2")):
        code, w = ctl("watch", old["rollout"], "--timeout", "20")
        assert code == 1 and "superseded by deployment" in w, w
        if new is not None:
            assert f"superseded by deployment {new['rollout']}" in w, w
        _, rows = ctl.json("rollouts")
        row = next(r for r in rows if r["id"] == old["rollout"])
        assert row["status"] == "failed" and row["counts"]["running"] == 0, row
        _, shown = ctl.json("rollout", "show", old["rollout"])
        assert shown["hosts"][host]["result"] == "cancelled", shown["hosts"][host]
    # the newer rollout still reaches w2 once it comes online
    fleet.start_simulated(["w2"])
    code, w = ctl("watch", fourth["rollout"], "--timeout", "60")
    assert code == 0, w


def test_deploy_check_and_rollback_after_restoring_an_older_state_backup(  # type: ignore[no-untyped-def]
        make_fleet, monkeypatch, capsys) -> None:
    """Restoring an older backup of state.jsonl (the documented recovery step) left the
    log's generations behind what the hosts had already taken: every deploy, check and
    rollback to them ended `stale_generation`. Now a host's generation is above what its
    retained state and desired state say it has seen, and the log records the one used."""
    import shutil
    fleet = make_fleet({"w1": ["web"], "w2": ["web"]})
    fleet.start_simulated(["w1", "w2"])
    ctl = InProcess(fleet, monkeypatch, capsys)
    log, backup = fleet.controller_dir / "state.jsonl", fleet.root / "state.jsonl.bak"
    assert ctl.json("deploy", "@web", "--system", "/nix/store/a-sys")[0] == 0  # generation 1
    shutil.copy(log, backup)
    assert ctl.json("deploy", "@web", "--system", "/nix/store/b-sys")[0] == 0  # generation 2
    # (what runs after the backup is restored, the generation each host must get)
    for argv, generation in ((("deploy", "@web", "--system", "/nix/store/c-sys"), 3),
                             (("deploy", "@web", "--system", "/nix/store/d-sys", "--check"), 4),
                             # only the retained desired states name the check's generation
                             (("rollback", "@web"), 5)):
        shutil.copy(backup, log)
        code, out = ctl.json(*argv)
        _, rows = ctl.json("rollouts")
        _, shown = ctl.json("rollout", "show", rows[-1]["id"])
        hosts = shown["hosts"]
        assert code == 0 and rows[-1]["status"] == "succeeded", (argv, out, hosts)
        assert {h: (hr["result"], hr["generation"]) for h, hr in hosts.items()} == {
            h: ("succeeded", generation) for h in ("w1", "w2")}, argv
        _, doc = ctl.json("state", "show")
        assert {h: doc["hosts"][h]["generation"] for h in hosts} == dict.fromkeys(
            hosts, generation), argv


def wait_for_rollout(fleet: Fleet, other: str) -> str:
    from tests.helpers import wait_for

    def new() -> str | None:
        _, rows = fleet.fleetctl_json("rollouts")
        fresh = [r for r in rows if r["id"] != other and r["counts"]["running"] == 1]
        return fresh[0]["id"] if fresh else None
    return str(wait_for(new, timeout=40, what="the new rollout to start its host"))


# -- the demo ----------------------------------------------------------------------------------

def test_demo_shows_canary_prompt_failure_rollback_retry_and_keeps_its_state(capsys) -> None:  # type: ignore[no-untyped-def]
    import re
    import shutil
    r = subprocess.run([sys.executable, "-m", "controller", "demo", "--hosts", "4",
                        "--delay", "0.05", "--prompt-deadline", "1"],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    seed = re.search(r"seed (\d+) \(--seed", out)
    assert seed, out  # a random seed, printed so a run can be repeated
    assert "canary demo-0001" in out and "4 agents online" in out
    first = out.index("4 agents online")
    assert "offline (queued)" not in out[first:]  # agents connected before the rollout
    assert "demo-0002 awaiting choice" in out and "fleetctl answer demo-0002" in out
    assert "demo-0002 succeeded" in out
    assert "demo-0004 rolled_back" in out and "demo-0004 succeeded switch to generation 2" in out
    assert "ERROR: could not obtain lock on relation orders" in out  # its log, shown
    assert "[restore:db] restored schema 15" in out
    # the simulated hosts run an earlier system, and the failed host went back to it
    assert re.search(r"\[rollback\] rolling back to \S+/demo-nixos-system-25\.05\b", out), out
    state = Path(re.search(r"export FLEET_STATE_DIR=(\S+)", out).group(1))  # type: ignore[union-attr]
    try:
        _, out, _ = fleetctl_main(capsys, "rollouts", "--json", "--state-dir", str(state))
        rows = json.loads(out)
        assert [x["status"] for x in rows] == ["succeeded"]
        _, logs, _ = fleetctl_main(capsys, "logs", "demo-0004", "--deployment", rows[0]["id"],
                                   "--state-dir", str(state))
        assert "step 2: rebuilding indexes" in logs and "could not obtain lock" in logs, logs
        _, logs, _ = fleetctl_main(capsys, "logs", "demo-0002", "--state-dir", str(state))
        assert re.search(r"deadline.*in-place", logs), logs  # the policy's default, taken
    finally:
        shutil.rmtree(state.parent, ignore_errors=True)
    # the exit code is a deploy's: every host failing fails the demo
    r = subprocess.run([sys.executable, "-m", "controller", "demo", "--hosts", "1",
                        "--fail-rate", "1", "--delay", "0.05", "--seed", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and ("rollout failed" in r.stdout or "rollout aborted" in r.stdout), \
        r.stdout + r.stderr
    shutil.rmtree(re.search(r"state in (\S+)", r.stdout).group(1), ignore_errors=True)  # type: ignore[union-attr]


def test_package_metadata_uses_an_spdx_license() -> None:
    import tomllib
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    # `license = {text = ...}` makes setuptools print a screen of deprecation warnings
    assert meta["project"]["license"] == "MIT"
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])


def test_state_repair_recovers_a_log_with_a_corrupt_middle_line(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from controller.state import store
    from controller.state.eventlog import EventLog
    log = EventLog(tmp_path)
    for i in range(4):
        log.append("rollout-created", store.create_rollout(
            log.doc, f"r{i}", "@web", "/nix/store/x", "switch", {}, [["w1"]]))
    lines = log.path.read_text().splitlines()
    lines[2] = lines[2][:40] + "#garbage"  # a corrupt line in the middle
    log.path.write_text("\n".join(lines) + "\n")
    code, _, err = fleetctl_main(capsys, "rollouts", "--state-dir", str(tmp_path))
    assert code == 2 and "fleetctl state repair" in err, err
    # the README's old recipe, removing the line, left `index 3 follows 1`; repair works
    code, out, err = fleetctl_main(capsys, "state", "repair", "--state-dir", str(tmp_path))
    assert code == 0 and "skipped 1" in out, out + err
    code, out, _ = fleetctl_main(capsys, "rollouts", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["r0", "r2", "r3"]
    assert list(tmp_path.glob("state.jsonl.damaged-*"))
    log.append("rollout-created", store.create_rollout(
        EventLog(tmp_path).load(), "r9", "@web", "/nix/store/x", "switch", {}, [["w1"]]))
    assert "r9" in EventLog(tmp_path).load()["rollouts"]


@pytest.mark.parametrize("bad", [
    '{"index": 2, "meta": {}, "patch": "x"}',  # used to be an AttributeError traceback
    '{"index": 2, "meta": {}, "patch": [1]}',
    # applies, but every reader of the rollouts then failed ('list' has no .items())
    '{"index": 2, "meta": {}, "patch": [{"op": "replace", "path": "/rollouts", "value": []}]}',
])
def test_an_entry_that_breaks_the_document_is_named_and_repair_keeps_what_follows(  # type: ignore[no-untyped-def]
        capsys, tmp_path: Path, bad: str) -> None:
    log = _four_rollouts(tmp_path)
    lines = log.path.read_text().splitlines()
    renumbered = [json.dumps({**json.loads(ln), "index": json.loads(ln)["index"] + 1})
                  for ln in lines[2:]]  # the bad entry goes in as index 2, the rest follow
    log.path.write_text("\n".join([*lines[:2], bad, *renumbered]) + "\n")
    for argv in (["rollouts"], ["state", "show"], ["rollout", "show", "r0"], ["logs", "r0"]):
        code, out, err = fleetctl_main(capsys, *argv, "--state-dir", str(tmp_path))
        assert code == 2 and "after index 1 is corrupt" in err and "fleetctl state repair" \
            in err and len(err.strip().splitlines()) == 1, (argv, out, err)
    code, out, err = fleetctl_main(capsys, "state", "repair", "--state-dir", str(tmp_path))
    assert code == 0 and "skipped 1" in out, out + err
    code, out, err = fleetctl_main(capsys, "rollouts", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["r0", "r1", "r2", "r3"], err


def test_state_repair_rebuilds_a_log_whose_first_line_is_lost(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Only the init line gone: repair used to find `no readable entry` and give up."""
    log = _four_rollouts(tmp_path)
    log.path.write_text("\n".join(log.path.read_text().splitlines()[1:]) + "\n")
    code, out, err = fleetctl_main(capsys, "state", "repair", "--state-dir", str(tmp_path))
    assert code == 0 and "rebuilt" in out, out + err
    code, out, err = fleetctl_main(capsys, "rollouts", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["r0", "r1", "r2", "r3"], err


def _four_rollouts(tmp_path: Path):  # type: ignore[no-untyped-def]
    from controller.state import store
    from controller.state.eventlog import EventLog
    log = EventLog(tmp_path)
    for i in range(4):
        log.append("rollout-created", store.create_rollout(
            log.doc, f"r{i}", "@web", "/nix/store/x", "switch", {}, [["w1"]]))
    return log


def test_state_repair_leaves_a_healthy_log_and_its_history_alone(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Repairing a log that loads whole used to replace its history by one snapshot and
    keep the intact original as `state.jsonl.damaged-*`."""
    log = _four_rollouts(tmp_path)
    before = log.path.read_bytes()
    code, out, err = fleetctl_main(capsys, "state", "repair", "--state-dir", str(tmp_path))
    assert code == 0 and "nothing to repair" in out, out + err
    assert log.path.read_bytes() == before and not list(tmp_path.glob("state.jsonl.damaged-*"))
    code, out, _ = fleetctl_main(capsys, "state", "repair", "--json", "--state-dir",
                                 str(tmp_path))
    assert code == 0 and json.loads(out) == {"kept": len(before.splitlines()), "skipped": [],
                                             "damaged_copy": None}


def test_state_repair_rebuilds_a_log_with_a_line_removed(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every line parses, but an index is missing: the log does not load, so it is no
    healthy log and repair rebuilds it."""
    log = _four_rollouts(tmp_path)
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    code, out, err = fleetctl_main(capsys, "state", "repair", "--state-dir", str(tmp_path))
    assert code == 0 and "rebuilt" in out and "damaged file is kept" in out, out + err
    code, out, _ = fleetctl_main(capsys, "rollouts", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["r0", "r2", "r3"]  # r1's line
    assert list(tmp_path.glob("state.jsonl.damaged-*"))


def test_state_repair_never_replaces_an_earlier_damaged_copy(capsys, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             monkeypatch) -> None:
    import time
    log = _four_rollouts(tmp_path)
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # both repairs: one second
    for garbage in (b"#first\n", b"#second\n"):
        with open(log.path, "ab") as fh:
            fh.write(garbage)
        code, out, err = fleetctl_main(capsys, "state", "repair", "--state-dir", str(tmp_path))
        assert code == 0 and "skipped 1" in out, out + err
    kept = sorted(p.read_bytes() for p in tmp_path.glob("state.jsonl.damaged-*"))
    assert len(kept) == 2 and any(b"#first" in k for k in kept) \
        and any(b"#second" in k for k in kept), kept
