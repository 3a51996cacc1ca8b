"""Issue 15, the dashboard's pure parts: who may do what, addresses, what a row shows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controller.follow.view import HostView
from controller.mqtt.broker import free_port
from controller.web.app import _local_path
from controller.web.auth import Guard, TokenFile, is_loopback, parse_listen
from controller.web.feed import HostLive
from controller.web.pages import fleet_host, short_system, sort_rows
from protocol.errors import InputError, UsageError
from protocol.models import HostState, Prompt
from tests.conftest import fleetctl

LISTEN = [
    ("127.0.0.1:8470", ("127.0.0.1", 8470)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9000", ("::1", 9000)),
    ("localhost:80", ("localhost", 80)),
    ("8470", UsageError),
    (":8470", UsageError),
    ("127.0.0.1:http", UsageError),
    ("127.0.0.1:70000", UsageError),
]


@pytest.mark.parametrize(("value", "expected"), LISTEN)
def test_parse_listen(value: str, expected: object) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse_listen(value)
    else:
        assert parse_listen(value) == expected


LOOPBACK = [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
            ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
            ("evil.example", False), ("", False)]


@pytest.mark.parametrize(("host", "expected"), LOOPBACK)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize(("system", "expected"), [
    ("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-25.11", "01234567"),
    ("/nix/store/demo-nixos-system", "demo-nixos-syste"),
    (None, "-"),
    ("", "-"),
])
def test_short_system(system: str | None, expected: str) -> None:
    assert short_system(system) == expected


@pytest.mark.parametrize(("target", "expected"), [
    ("/rollouts/r1", "/rollouts/r1"), ("/?select=@web", "/?select=@web"),
    ("//evil.example/x", "/"), ("https://evil.example/", "/"), ("rollouts", "/"),
    ("/\\evil", "/\\evil"),
])
def test_login_redirects_stay_on_the_site(target: str, expected: str) -> None:
    assert _local_path(target) == expected


def test_tokens_are_stored_hashed_and_revocable(tmp_path: Path) -> None:
    tokens = TokenFile(tmp_path / "tokens.json")
    assert not tokens.any()
    secret = tokens.add("alice")
    assert secret.startswith("flt_") and len(secret) > 40
    assert secret not in (tmp_path / "tokens.json").read_text()
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    assert tokens.check(secret) == "alice" and tokens.check(secret + "x") is None
    bob = tokens.add("bob")
    assert tokens.names() == ["alice", "bob"]
    again = tokens.add("alice")  # a new token under the same name replaces the old one
    assert tokens.check(secret) is None and tokens.check(again) == "alice"
    assert tokens.revoke("bob") and not tokens.revoke("bob")
    assert TokenFile(tmp_path / "tokens.json").check(bob) is None  # a fresh reader agrees
    with pytest.raises(UsageError):
        tokens.add("no spaces")
    (tmp_path / "bad.json").write_text('{"tokens": [{"name": 1}]}')
    with pytest.raises(InputError):
        TokenFile(tmp_path / "bad.json").any()


def test_guard_decides_who_a_request_is(tmp_path: Path) -> None:
    tokens = TokenFile(tmp_path / "tokens.json")
    open_local = Guard(tokens, loopback_listener=True)
    exposed = Guard(tokens, loopback_listener=False)
    # loopback without tokens: everyone is `local`; exposed: nobody without a token
    assert open_local.identify(None, None).name == "local"  # type: ignore[union-attr]
    assert exposed.identify(None, None) is None
    secret = tokens.add("alice")
    time.sleep(0.01)
    # once a token exists the loopback listener wants one too (a reverse proxy in front)
    assert open_local.tokens_required and open_local.identify(None, None) is None
    who = exposed.identify(f"Bearer {secret}", None)
    assert who is not None and who.bearer and who.actor == "web:alice"
    assert exposed.identify("Bearer nope", None) is None
    assert exposed.identify(f"Basic {secret}", None) is None
    assert exposed.login("nope") is None
    sid, name = exposed.login(secret)  # type: ignore[misc]
    assert name == "alice"
    who = exposed.identify(None, sid)
    assert who is not None and not who.bearer and who.actor == "web:alice"
    assert exposed.identify(None, sid + "x") is None
    # CSRF tokens are bound to the session
    csrf = exposed.csrf_token(who.session)
    assert exposed.csrf_ok(who.session, csrf)
    assert not exposed.csrf_ok(who.session, "") and not exposed.csrf_ok("local", csrf)
    # a revoked token ends its sessions
    tokens.revoke("alice")
    assert exposed.identify(None, sid) is None


def _state(**kw: object) -> HostState:
    return HostState(host="h1", updated_at=1.0, **kw)  # type: ignore[arg-type]


ROWS = [
    # what is known -> (phase label, result, percent)
    ("nothing yet", HostLive("h1", ("web",)), ("no state", None, None)),
    ("idle host", HostLive("h1", (), state=_state(), online=True), ("idle", None, None)),
    ("queued while offline",
     HostLive("h1", (), online=False, view=HostView("h1", deployment_id="d1", phase="published")),
     ("offline (queued)", None, None)),
    ("fetching",
     HostLive("h1", (), online=True,
              view=HostView("h1", deployment_id="d1", phase="fetch", percent=40.0)),
     ("fetch", None, 40.0)),
    ("migrating a step",
     HostLive("h1", (), online=True,
              view=HostView("h1", deployment_id="d1", phase="migrate", step="db")),
     ("migrating db", None, None)),
    ("waiting for a choice",
     HostLive("h1", (), online=True, view=HostView("h1", deployment_id="d1",
                                                   phase="awaiting_choice")),
     ("awaiting choice", None, None)),
    ("finished: the view's result wins over an older state",
     HostLive("h1", (), online=True, state=_state(last_result="failed"),
              view=HostView("h1", deployment_id="d2", phase="succeeded", result="succeeded",
                            percent=100.0)),
     ("succeeded", "succeeded", None)),
]


@pytest.mark.parametrize(("what", "live", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_fleet_row(what: str, live: HostLive, expected: tuple[object, ...]) -> None:
    row = fleet_host(live)
    assert (row["phase"], row["result"], row["percent"]) == expected
    assert {"host", "online", "system", "generation", "phase", "result", "needs_reboot",
            "deployment", "message", "open_prompt", "updated_at", "tags"} <= set(row)


def test_fleet_row_shows_the_open_prompt() -> None:
    p = Prompt(host="h1", prompt_id="d1.approve", deployment_id="d1", generation=1,
               kind="approval", created_at=1.0)
    row = fleet_host(HostLive("h1", (), prompt=p))
    assert (row["open_prompt"], row["prompt_kind"]) == ("d1.approve", "approval")


def test_sort_rows() -> None:
    rows = [{"host": h, "phase": p, "generation": g, "online": o, "result": r,
             "updated_at": u} for h, p, g, o, r, u in
            [("b", "succeeded", 2, True, "succeeded", 3.0), ("a", "fetch", 1, False, None, 1.0),
             ("c", "acked", 3, True, "failed", 2.0)]]
    assert [r["host"] for r in sort_rows(rows, "host")] == ["a", "b", "c"]
    assert [r["host"] for r in sort_rows(rows, "phase")] == ["c", "a", "b"]
    assert [r["host"] for r in sort_rows(rows, "generation")] == ["c", "b", "a"]
    assert [r["host"] for r in sort_rows(rows, "online")] == ["a", "b", "c"]
    assert [r["host"] for r in sort_rows(rows, "updated")] == ["b", "c", "a"]


def test_serve_bad_input_is_one_line(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text('[hosts.h1]\ntags = ["web"]\n')
    env = {"FLEET_INVENTORY": str(inv), "FLEET_STATE_DIR": str(tmp_path / "state"),
           "FLEET_BROKER": f"mqtt://127.0.0.1:{free_port()}"}
    r = fleetctl("serve", "--listen", "nonsense", env=env)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    r = fleetctl("serve", "--listen", f"127.0.0.1:{free_port()}", env=env)  # broker down
    assert r.returncode == 3 and "cannot reach the MQTT broker" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
