"""Every number a command-line option takes is checked before anything runs.

`float()` takes `nan`, `inf` and `-5`: an infinite `--timeout` is an endless wait, an
`--expires-in` of -5 publishes a deploy every agent ignores, an infinite
`--confirm-timeout` lets an agent that lost its broker wait for ever instead of rolling
back. Each is refused with one line naming the option, exit 2, and nothing is recorded.
Both programs run in-process here (their real `main`), the controller with its keys in
place and a broker address nobody listens on, so an option that is not checked gets as
far as connecting (exit 3) and fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.agent import Agent
from client.cli import main as agent_main
from controller.cli import main as fleetctl_main
from controller.state.keys import init_keys

STORE = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system"
DEPLOY = ("deploy", "web1", "--system", STORE)
# 1e20 s is as endless a wait as inf: a duration is at most 30 days (2592000 s)
SECONDS = ("nan", "inf", "-inf", "-1", "0", "ten", "1e20", "2592001")
PAUSE = ("nan", "inf", "-1", "x", "1e20")  # 0 is a valid pause
COUNTS = ("-1", "1.5", "x")
POSITIVE = ("0", "-3")
# a validity is added to today's date: past the year 9999 it overflowed with a traceback
DAYS = ("3000000", "99999999999", "36501", "1e3", "ten", *POSITIVE)

FLEETCTL_CASES = [
    (DEPLOY, "--timeout", SECONDS),
    (DEPLOY, "--expires-in", SECONDS),
    (DEPLOY, "--host-timeout", SECONDS),
    (DEPLOY, "--confirm-timeout", SECONDS),
    (DEPLOY, "--prompt-deadline", SECONDS),
    (DEPLOY, "--pause-between-batches", PAUSE),
    (DEPLOY, "--connect-timeout", SECONDS),
    (DEPLOY, "--canary", COUNTS),
    (DEPLOY, "--retries", COUNTS),
    (DEPLOY, "--min-executed", COUNTS),
    (DEPLOY, "--max-parallel", POSITIVE),
    (DEPLOY, "--max-jobs", POSITIVE),
    (("watch", "r1"), "--timeout", SECONDS),
    (("rollout", "resume", "r1"), "--timeout", SECONDS),
    (("rollout", "continue", "r1"), "--batch", POSITIVE),
    (("rollback", "web1"), "--timeout", SECONDS),
    (("rollback", "web1"), "--max-parallel", POSITIVE),
    (("rollouts",), "--limit", COUNTS),
    (("logs", "web1"), "--lines", COUNTS),
    (("status",), "--connect-timeout", SECONDS),
    (("demo",), "--hosts", POSITIVE),
    (("demo",), "--fail-rate", ("nan", "2", "-0.1")),
    (("demo",), "--delay", PAUSE),
    (("demo",), "--prompt-deadline", SECONDS),
    (("certs", "init"), "--days", DAYS),
    (("certs", "host", "web1"), "--days", DAYS),
]


@pytest.fixture
def controller_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    init_keys(state)
    (tmp_path / "fleet.toml").write_text('[hosts.web1]\ntags = ["web"]\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_STATE_DIR", str(state))
    monkeypatch.setenv("FLEET_BROKER", "mqtt://127.0.0.1:9")  # nobody listens there
    monkeypatch.delenv("FLEET_CONNECT_TIMEOUT", raising=False)
    return state


def run_fleetctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = fleetctl_main([*argv, "--connect-timeout", "0.2"]
                             if "--connect-timeout" not in argv else list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_one_line_naming(code: int, err: str, option: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and option in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "option", "values"), FLEETCTL_CASES,
                         ids=[f"{' '.join(a[:2])} {o}" for a, o, _ in FLEETCTL_CASES])
def test_fleetctl_refuses_a_bad_number_naming_the_option(
        controller_dir: Path, capsys: pytest.CaptureFixture[str],
        argv: tuple[str, ...], option: str, values: tuple[str, ...]) -> None:
    before = sorted(p.name for p in controller_dir.rglob("*"))
    for value in values:
        code, err = run_fleetctl(capsys, *argv, f"{option}={value}")
        assert_one_line_naming(code, err, option)
        assert repr(value) in err, err  # the value given is quoted back
    assert sorted(p.name for p in controller_dir.rglob("*")) == before  # nothing recorded


def test_fleetctl_takes_the_numbers_it_should(controller_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The checks refuse only what is wrong: a zero pause and fractional seconds pass
    them, and the command goes on to the broker (which is not there: exit 3)."""
    code, err = run_fleetctl(capsys, *DEPLOY, "--pause-between-batches", "0", "--timeout",
                             "0.5", "--expires-in", "1e3", "--canary", "0", "--retries", "2")
    assert code == 3 and "cannot reach the MQTT broker" in err, err


@pytest.mark.parametrize("value", ["inf", "nan", "-2", "soon"])
def test_connect_timeout_from_the_environment_is_checked_the_same_way(
        controller_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FLEET_CONNECT_TIMEOUT", value)
    code = fleetctl_main(["status"])
    err = capsys.readouterr().err
    assert_one_line_naming(code, err, "FLEET_CONNECT_TIMEOUT")


@pytest.mark.parametrize("key", ["host_timeout", "pause_between_batches"])
def test_a_duration_from_the_inventory_has_the_options_bounds(
        controller_dir: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    """[rollout] host_timeout = 1e20 was taken (only nan, inf and negatives were not)."""
    (controller_dir.parent / "fleet.toml").write_text(
        f'[hosts.web1]\ntags = ["web"]\n[rollout]\n{key} = 1e20\n')
    code, err = run_fleetctl(capsys, *DEPLOY)
    assert_one_line_naming(code, err, f"[rollout] {key}")
    assert "30 days" in err, err


def test_a_deploy_policy_error_names_its_option(controller_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_fleetctl(capsys, *DEPLOY, "--reboot", "at noon")
    assert_one_line_naming(code, err, "--reboot")
    assert "Value error" not in err


AGENT_CASES = [
    ("--sim-fail-rate", ("2", "-0.5", "nan", "x")),
    ("--sim-fetch-delay", PAUSE),
    ("--sim-switch-delay", PAUSE),
    ("--dump-retention", ("0", "-1", "x")),  # 0 would keep no dump to roll data back to
    ("--mqtt-version", ("6", "3.1")),
]


@pytest.mark.parametrize(("option", "values"), AGENT_CASES, ids=[o for o, _ in AGENT_CASES])
def test_agent_refuses_a_bad_option_value_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
        values: tuple[str, ...]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _, pub = init_keys(state)
    for value in values:
        with pytest.raises(SystemExit) as exc:
            agent_main(["simulate", "--hosts", "web1", "--state-dir", str(tmp_path / "agents"),
                        "--trust-key", str(pub), "--broker", "mqtt://127.0.0.1:9",
                        f"{option}={value}"])
        assert_one_line_naming(int(exc.value.code or 0), capsys.readouterr().err, option)
    assert not (tmp_path / "agents").exists()


@pytest.mark.parametrize(("hosts", "line"), [
    ("a,a", "duplicate host 'a' in --hosts"),
    ("web1,web2,web1", "duplicate host 'web1' in --hosts"),
    ("a,,b", "invalid --hosts: an empty entry between commas"),
    ("a,", "invalid --hosts: an empty entry between commas"),
    (",", "--hosts needs at least one host name"),
    ("a,Web_1", "--hosts: invalid host name 'Web_1'"),
    ("a,-b", "--hosts: invalid host name '-b'"),
    ("a," + "x" * 64, "--hosts: invalid host name"),
])
def test_simulate_refuses_a_bad_hosts_list_before_any_agent_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        hosts: str, line: str) -> None:
    """Two agents of one name share an MQTT client id and knock each other off the
    broker for ever; an empty or invalid name is refused like --broker's."""
    _, pub = init_keys(tmp_path)
    served = serve_nothing(monkeypatch)
    code = agent_main(["simulate", "--hosts", hosts, "--state-dir", str(tmp_path / "agents"),
                       "--trust-key", str(pub), "--broker", "mqtt://127.0.0.1:9"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"fleet-agent: error: {line}"), lines
    assert served == [] and not (tmp_path / "agents").exists()


def test_simulate_runs_the_hosts_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    _, pub = init_keys(tmp_path)
    served = serve_nothing(monkeypatch)
    assert agent_main(["simulate", "--hosts", "web1, web2,db1", "--state-dir",
                       str(tmp_path / "agents"), "--trust-key", str(pub)]) == 0
    assert served == ["web1", "web2", "db1"]


def serve_nothing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The agents `fleet-agent simulate` would run, without connecting them."""
    import client.cli
    served: list[str] = []

    async def serve(agents: list[Agent]) -> None:
        for agent in agents:
            served.append(agent.host)
            agent.journal.close()

    monkeypatch.setattr(client.cli, "_serve", serve)
    return served


@pytest.mark.parametrize("argv", [["launch"], ["run"], ["run", "--host", "web1"], []])
def test_agent_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                         argv: list[str]) -> None:
    """Not the whole usage text (28 lines for `simulate`): journald shows one line."""
    with pytest.raises(SystemExit) as exc:
        agent_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet-agent") and "error:" in lines[0], err


def test_the_checks_at_their_bounds() -> None:
    from protocol.errors import UsageError
    from protocol.numbers import seconds, share, whole
    assert seconds("1.5") == 1.5 and seconds("0", zero=True) == 0.0
    assert seconds("2592000") == 30 * 86400  # 30 days, the longest duration
    assert whole("3", minimum=1) == 3 and share("0.25") == 0.25
    assert whole("3", minimum=1, maximum=3) == 3
    for call in (lambda: seconds("0"), lambda: seconds("1e400"), lambda: whole("0", minimum=1),
                 lambda: whole("4", minimum=1, maximum=3),
                 lambda: share("1.01"), lambda: seconds("-0.0", zero=False),
                 lambda: seconds("2592000.5"), lambda: seconds(1e20, zero=True)):
        with pytest.raises(UsageError):
            call()


@pytest.mark.parametrize(("value", "why"), [("127.0.0.1:99999", "port must be 0-65535"),
                                            ("localhost", "give HOST:PORT"),
                                            ("10.1.2.3:8470", "loopback address only")])
def test_demo_serve_is_checked_before_the_demo_starts(
        controller_dir: Path, capsys: pytest.CaptureFixture[str], value: str,
        why: str) -> None:
    """Not after a broker and the simulated fleet came up (it said `--listen`, an option
    `demo` does not have)."""
    with pytest.raises(SystemExit) as exc:  # UsageError is main's; this is before it
        raise SystemExit(fleetctl_main(["demo", "--hosts", "2", "--serve", value]))
    out = capsys.readouterr()
    assert_one_line_naming(int(exc.value.code or 0), out.err, "--serve")
    assert why in out.err and out.out == ""  # no "flotilla demo ...", no "agents online"


def test_a_bad_mqtt_version_from_the_environment_names_the_variable(
        controller_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Set once in a profile and forgotten: the line says where the value came from."""
    monkeypatch.setenv("FLEET_MQTT_VERSION", "3.1")
    assert_one_line_naming(fleetctl_main(["status"]), capsys.readouterr().err,
                           "FLEET_MQTT_VERSION")
    with pytest.raises(SystemExit) as exc:
        agent_main(["run", "--host", "web1", "--state-dir", str(controller_dir / "agent"),
                    "--trust-key", str(controller_dir / "controller.pub")])
    assert_one_line_naming(int(exc.value.code or 0), capsys.readouterr().err,
                           "FLEET_MQTT_VERSION")


@pytest.mark.parametrize("argv", [
    ["run", "--host", "web1", "--trust-key", "/nonexistent.pub"],
    ["simulate", "--hosts", "web1", "--trust-key", "/nonexistent.pub"],
    ["journal", "check"], ["journal", "repair"], ["prompt"],
])
def test_an_empty_agent_state_dir_is_refused_not_the_current_directory(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--state-dir ''` was Path(''), the current directory: a journal repair there, or an
    agent writing its journal and dumps into wherever it was started."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        agent_main([*argv, "--state-dir", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--state-dir" in err[0] \
        and "empty" in err[0], err
    assert list(tmp_path.iterdir()) == []
