"""Issue 10, symptoms 2, 7 and 8: what the controller reads and is given, against a real
broker and real agents.

- A desired state the host refuses for its signature is counted `rejected` at once,
  with the reason, from the ids of its (unverified) body: no waiting for --timeout.
- One stray retained message (a bad host name in the topic, garbage on a host's state)
  is skipped with one warning line naming the topic by every reader (status, deploy,
  watch, prompts); a valid host whose state is garbage is shown as unreadable, not as
  "offline, no data".
- `fleetctl deploy --system` takes a store path, an existing absolute directory or a
  flake ref; anything else is exit 2 with an example.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.state.keys import init_keys
from protocol.codec import encode
from protocol.messages import BadHostMessage, host_message
from protocol.models import HostState
from protocol.topics import Topics
from tests.helpers import Fleet, deploy_bg, publish, wait_prompt


def warnings_about(stderr: str, topic_part: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if topic_part in ln]


# -- 2: a rejection is counted at once --------------------------------------------------------
def test_untrusted_signature_is_counted_rejected_at_once(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet: Fleet = make_fleet({"rj1": ["x"]})
    fleet.start_agent("rj1")
    other = tmp_path / "other-controller"
    init_keys(other)  # a controller key rj1 does not trust
    r = subprocess.run([sys.executable, "-m", "controller", "deploy", "rj1", "--system",
                        "/nix/store/untrusted-sys", "--timeout", "45", "--json"],
                       capture_output=True, text=True, timeout=90,
                       env={**fleet.env(), "FLEET_STATE_DIR": str(other)})
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["hosts"] == {"rj1": "rejected"}, (out, r.stderr)  # not timed_out
    assert r.returncode != 0
    rc, rows = fleet.fleetctl_json("status", "rj1")
    assert rows[0]["generation"] == 0 and rows[0]["system"] is None  # nothing ran
    journal = fleet.journal("rj1")
    assert not [rec for rec in journal if rec["kind"] == "accept"]


def test_rejected_event_carries_the_unverified_ids(make_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from protocol.models import Rejected
    from tests.helpers import Listener

    fleet: Fleet = make_fleet({"rj2": ["x"]})
    fleet.start_agent("rj2")
    other = tmp_path / "other-controller"
    init_keys(other)

    async def run() -> Rejected:
        t = Topics(fleet.prefix)
        async with Listener(fleet.broker_url, t.events("rj2")) as events:
            await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "controller", "deploy", "rj2", "--system",
                "/nix/store/untrusted-sys", "--no-wait", "--json"], capture_output=True,
                text=True, timeout=60, env={**fleet.env(), "FLEET_STATE_DIR": str(other)})
            ev = await events.wait(lambda e: isinstance(e, Rejected), timeout=30)
            assert isinstance(ev, Rejected)
            return ev
    ev = asyncio.run(run())
    assert ev.reason == "bad_signature" and ev.unverified is True
    assert ev.deployment_id is not None and ev.generation == 1


# -- 7: one parse for every reader -------------------------------------------------------------
T = Topics("fleet/v1")
STATE = encode(HostState(host="web1", updated_at=1.0))


@pytest.mark.parametrize(("topic", "payload", "why"), [
    ("fleet/v1/host/Web1/state", STATE, "invalid host name"),
    ("fleet/v1/host/web1/state/x", STATE, "not a Flotilla host topic"),
    ("fleet/v1/host/web1/state", b"x", "envelope"),
    ("fleet/v1/host/web1/state", encode(HostState(host="web2", updated_at=1.0)),
     "is for host web2"),
    ("fleet/v1/host/web1/events", STATE, "unexpected message type"),
    ("fleet/v1/host/web1/online", b"maybe", "online or offline"),
    ("fleet/v1/host/web1/" + "x" * 500, b"", "not a Flotilla host topic"),
])
def test_host_message_refuses_with_one_line_naming_the_topic(topic: str, payload: bytes,
                                                            why: str) -> None:
    with pytest.raises(BadHostMessage) as info:
        host_message(T, topic, payload)
    text = str(info.value)
    assert why in text and "\n" not in text and len(text) < 400
    assert topic[:60] in text


def test_host_message_parses_what_readers_need() -> None:
    m = host_message(T, "fleet/v1/host/web1/state", STATE)
    assert (m.host, m.kind, m.body) == ("web1", "state", HostState(host="web1", updated_at=1.0))
    assert host_message(T, "fleet/v1/host/web1/state", b"").body is None  # cleared
    assert host_message(T, "fleet/v1/host/web1/online", b"online").online is True
    assert host_message(T, "fleet/v1/host/web1/online", b"offline").online is False
    with pytest.raises(BadHostMessage) as info:
        host_message(T, "fleet/v1/host/web1/state", b"garbage")
    assert info.value.host == "web1"  # the reader can still say which host is unreadable


def test_stray_retained_messages_are_skipped_by_every_reader(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet: Fleet = make_fleet({"ok1": ["x"], "bad1": ["x"]})
    t = Topics(fleet.prefix)
    stray = f"{fleet.prefix}/host/Web1/state"

    async def plant() -> None:
        await publish(fleet.broker_url, stray, b"x", retain=True)
        await publish(fleet.broker_url, t.state("bad1"), b"garbage", retain=True)
        await publish(fleet.broker_url, f"{fleet.prefix}/host/Web1/prompt", b"x", retain=True)
    asyncio.run(plant())
    fleet.start_agent("ok1")

    r = fleet.fleetctl("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["host"]: row for row in json.loads(r.stdout.strip().splitlines()[-1])}
    assert "Traceback" not in r.stderr
    assert len(warnings_about(r.stderr, "Web1/state")) == 1, r.stderr
    bad = rows["bad1"]
    assert bad["phase"] == "unreadable" and "envelope" in bad["error"]
    r = fleet.fleetctl("status")  # the table says so too
    assert r.returncode == 0 and "unreadable" in r.stdout, r.stdout + r.stderr

    # the deploy driver and a `watch` of the running rollout (both read the broker)
    proc = deploy_bg(fleet, "ok1", "--system", "/nix/store/after-stray", "--approval", "ask",
                     "--timeout", "60")
    wait_prompt(fleet, "ok1", "approval")
    watch = subprocess.Popen([sys.executable, "-m", "controller", "watch", "--json",
                              "--timeout", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=fleet.env())
    r = fleet.fleetctl("prompts", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len(warnings_about(r.stderr, "Web1/prompt")) == 1, r.stderr
    rc, _ = fleet.fleetctl_json("approve", "ok1")
    assert rc == 0
    out_text, err_text = proc.communicate(timeout=60)
    assert proc.returncode == 0, err_text
    out = json.loads(out_text.strip().splitlines()[-1])
    assert out["hosts"] == {"ok1": "succeeded"}
    assert len(warnings_about(err_text, "Web1/state")) == 1, err_text
    w_out, w_err = watch.communicate(timeout=60)
    assert watch.returncode == 0, w_err
    assert json.loads(w_out.strip().splitlines()[-1])["hosts"] == {"ok1": "succeeded"}
    assert len(warnings_about(w_err, "Web1/state")) == 1, w_err


# -- 8: --system is checked --------------------------------------------------------------------
@pytest.mark.parametrize("system", ["hello world", "./result", "/nonexistent/dir", "result",
                                    "nixpkgs", "/nix/store", "/nix/store/", "foo#",
                                    "ftp:x"])
def test_deploy_refuses_a_system_that_is_no_path_or_flake(make_fleet, system: str) -> None:  # type: ignore[no-untyped-def]
    fleet: Fleet = make_fleet({"sy1": ["x"]})
    r = fleet.fleetctl("deploy", "sy1", "--system", system, "--timeout", "5")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--system" in lines[0] and "e.g." in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("system", ["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system",
                                    ".#web1", "github:me/fleet#web1",
                                    "git+https://example.org/fleet.git#web1",
                                    "path:/srv/fleet#web1", "DIR"])
def test_deploy_accepts_store_paths_flake_refs_and_sim_directories(
        make_fleet, tmp_path: Path, system: str) -> None:  # type: ignore[no-untyped-def]
    from controller.build.systemref import check_system
    if system == "DIR":
        system = str(tmp_path)
    assert check_system(system) == system
