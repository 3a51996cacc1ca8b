"""Issue 2 end to end: real Mosquitto, real fleetctl and fleet-agent processes."""

from __future__ import annotations

import base64
import json
import socket
import time

import msgpack

from protocol.codec import encode
from protocol.models import Desired, Rejected, Result
from protocol.signing import generate_key, key_id, sign, signed_data, verify_payload
from protocol.topics import Topics
from tests.helpers import Listener, publish, wait_for

SYSTEM = "/nix/store/aaaa-nixos-system-web-25.11"


def five(make_fleet):  # type: ignore[no-untyped-def]
    return make_fleet({f"web{i}": ["web"] for i in range(1, 6)} | {"db1": ["db"]},
                      {"frontend": ["@web"]})


def test_deploy_to_five_hosts_end_to_end(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = five(make_fleet)
    fleet.start_simulated([f"web{i}" for i in range(1, 6)] + ["db1"], "--sim-fetch-delay", "0.1")
    rc, out = fleet.fleetctl_json("deploy", "frontend", "--system", SYSTEM, "--timeout", "60")
    assert rc == 0, out
    assert out["status"] == "succeeded"
    assert out["succeeded"] == 5 and out["failed"] == 0 and out["not_started"] == 0
    assert out["hosts"] == {f"web{i}": "succeeded" for i in range(1, 6)}
    rc, rows = fleet.fleetctl_json("status")
    assert rc == 0
    by_host = {r["host"]: r for r in rows}
    for i in range(1, 6):
        row = by_host[f"web{i}"]
        assert row["online"] is True
        assert row["system"] == SYSTEM and row["generation"] == 1
        assert row["result"] == "succeeded" and row["phase"] == "done"
    assert by_host["db1"]["generation"] == 0 and by_host["db1"]["system"] is None
    # a second deploy gets the next generation
    rc, out = fleet.fleetctl_json("deploy", "web1", "--system", SYSTEM + "-2")
    assert rc == 0 and out["status"] == "succeeded"
    rc, rows = fleet.fleetctl_json("status", "web1")
    assert rows[0]["generation"] == 2 and rows[0]["system"] == SYSTEM + "-2"


def test_failed_host_makes_exit_1(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"a1": ["t"], "a2": ["t"]})
    fleet.start_simulated(["a1", "a2"])
    rc, out = fleet.fleetctl_json("deploy", "@t", "--system", "/nix/store/x-sim-fail-fetch")
    assert rc == 1
    assert out["status"] == "failed" and out["failed"] == 2
    assert set(out["hosts"].values()) == {"failed"}
    # a failed activation is rolled back (code), and still counts as a failure
    rc, out = fleet.fleetctl_json("deploy", "a1", "--system", "/nix/store/y-sim-fail-switch")
    assert rc == 1 and out["hosts"] == {"a1": "rolled_back"} and out["failed"] == 1


def test_offline_host_catches_up_from_retained_desired(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"on1": ["web"], "on2": ["web"], "off1": ["web"]})
    fleet.start_simulated(["on1", "on2"])
    rc, out = fleet.fleetctl_json("deploy", "@web", "--system", SYSTEM, "--timeout", "4")
    assert rc == 1
    assert out["status"] == "timed_out"
    assert out["hosts"]["on1"] == "succeeded" and out["hosts"]["on2"] == "succeeded"
    assert out["hosts"]["off1"] == "timed_out"
    fleet.start_agent("off1")  # comes online later; the retained desired waits for it

    def caught_up():  # type: ignore[no-untyped-def]
        _, rows = fleet.fleetctl_json("status", "off1")
        return rows[0]["result"] == "succeeded" and rows[0]
    row = wait_for(caught_up, timeout=30, what="off1 to apply the retained desired state")
    assert row["online"] is True and row["system"] == SYSTEM and row["generation"] == 1


async def test_restarted_agent_does_not_rerun(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"solo": ["x"]})
    agent = fleet.start_agent("solo")
    rc, out = fleet.fleetctl_json("deploy", "solo", "--system", SYSTEM)
    assert rc == 0, out
    switches_before = [r for r in fleet.journal("solo") if r.get("stage") == "switch"]
    agent.terminate()
    agent.wait(10)
    topics = Topics(fleet.prefix)
    async with Listener(fleet.broker_url, topics.events("solo")) as events:
        fleet.start_agent("solo")
        replay = await events.wait(lambda e: isinstance(e, Result), timeout=20)
    assert isinstance(replay, Result)
    assert replay.status == "succeeded" and replay.deployment_id == out["rollout"]
    journal = fleet.journal("solo")
    assert [r for r in journal if r.get("stage") == "switch"] == switches_before
    assert sum(1 for r in journal if r["kind"] == "accept") == 1
    assert sum(1 for r in journal if r["kind"] == "start") == 2


async def test_forged_wrong_host_and_stale_desired_are_rejected(make_fleet, signing_key) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"web1": ["web"]})
    fleet.start_agent("web1")
    rc, _ = fleet.fleetctl_json("deploy", "web1", "--system", SYSTEM)  # generation 1
    assert rc == 0
    topics = Topics(fleet.prefix)
    base = Desired(host="web1", deployment_id="manual-1", generation=5, system=SYSTEM + "-evil",
                   issued_at=time.time())
    cases = [
        ("forged", sign(base, generate_key()), "bad_signature"),
        ("unsigned", base, "bad_signature"),
        ("wrong-host", sign(base.model_copy(update={"host": "web2", "deployment_id": "m2"}),
                            signing_key), "wrong_host"),
        ("stale", sign(base.model_copy(update={"generation": 1, "deployment_id": "m3"}),
                       signing_key), "stale_generation"),
        ("expired", sign(base.model_copy(update={"deployment_id": "m4",
                                                 "expires_at": time.time() - 60}),
                         signing_key), "expired"),
    ]
    async with Listener(fleet.broker_url, topics.events("web1")) as events:
        for _name, desired, reason in cases:
            await publish(fleet.broker_url, topics.desired("web1"), encode(desired), retain=True)
            ev = await events.wait(lambda e, r=reason: isinstance(e, Rejected) and e.reason == r)
            assert isinstance(ev, Rejected) and ev.message
        await publish(fleet.broker_url, topics.desired("web1"), b"\x93garbage", retain=True)
        await events.wait(lambda e: isinstance(e, Rejected) and e.reason == "invalid_body")
    _, rows = fleet.fleetctl_json("status", "web1")
    assert rows[0]["system"] == SYSTEM and rows[0]["generation"] == 1  # nothing executed
    assert all(r.get("kind") != "accept" or r["generation"] == 1 for r in fleet.journal("web1"))


async def test_the_journal_keeps_the_signed_desired_state_as_received(  # type: ignore[no-untyped-def]
        make_fleet, signing_key, trusted) -> None:
    """The accept record is the evidence of who ordered this deployment: the bytes the
    controller signed, not this agent's re-encoding of what it decoded. A signer that
    writes a field at its default (another implementation, another version) signs it
    too; a re-encoding leaves it out, and its signature no longer verifies."""
    fleet = make_fleet({"web1": ["web"]})
    fleet.start_agent("web1")
    topics = Topics(fleet.prefix)
    body = {"host": "web1", "deployment_id": "manual-1", "generation": 1, "system": SYSTEM,
            "issued_at": time.time(), "check_only": False, "key_id": key_id(
                signing_key.public_key())}
    body["signature"] = signing_key.sign(signed_data("desired", body))
    payload = msgpack.packb({"v": 1, "type": "desired", "body": body}, use_bin_type=True)
    async with Listener(fleet.broker_url, topics.events("web1")) as events:
        await publish(fleet.broker_url, topics.desired("web1"), payload, retain=True)
        result = await events.wait(lambda e: isinstance(e, Result))
    assert isinstance(result, Result) and result.status == "succeeded"
    [accept] = [r for r in fleet.journal("web1") if r["kind"] == "accept"]
    journaled = base64.b64decode(accept["desired"])
    assert journaled == payload
    verify_payload(journaled, trusted)  # raises if the signature did not survive


def test_broker_down_gives_exit_3_and_one_line(make_fleet) -> None:  # type: ignore[no-untyped-def]
    from controller.mqtt.broker import free_port
    fleet = make_fleet({"web1": ["web"]})
    fleet.broker_url = f"mqtt://127.0.0.1:{free_port()}"
    for args in (["deploy", "web1", "--system", SYSTEM], ["status"]):
        started = time.monotonic()
        r = fleet.fleetctl(*args, "--connect-timeout", "2")
        assert time.monotonic() - started >= 2  # it kept trying for --connect-timeout
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert "cannot reach the MQTT broker" in lines[0]


def test_a_node_that_never_answers_costs_no_more_than_connect_timeout(  # type: ignore[no-untyped-def]
        make_fleet) -> None:
    """A node that accepts TCP and never sends a CONNACK (frozen, or a firewall that
    swallows MQTT): `--connect-timeout` bounds the whole wait, and a live node listed
    after it is used."""
    fleet = make_fleet({"web1": ["web"]})
    live = fleet.broker_url
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(16)  # the kernel completes the handshake; nobody ever reads
        url = f"mqtt://127.0.0.1:{frozen.getsockname()[1]}"
        fleet.broker_url = url
        started = time.monotonic()
        r = fleet.fleetctl("status", "--connect-timeout", "0.5")
        waited = time.monotonic() - started
        assert r.returncode == 3, r.stderr
        [line] = r.stderr.strip().splitlines()
        assert "cannot reach the MQTT broker" in line and url in line
        assert "no CONNACK within 0.5 s" in line  # not aiomqtt's bare "timed out"
        assert waited < 4.0  # 0.5 s and the command's start, not an attempt's own 5 s
        from controller.mqtt.broker import free_port
        dead = f"mqtt://127.0.0.1:{free_port()}"
        fleet.broker_url = f"{url},{dead}"
        r = fleet.fleetctl("status", "--connect-timeout", "0.5")
        assert r.returncode == 3, r.stderr
        [line] = r.stderr.strip().splitlines()  # each node, and why it did not answer
        assert f"{url}: took the connection, no CONNACK within" in line, line
        assert f"{dead}: " in line and "refused" in line.lower(), line
        fleet.broker_url = f"{url},{live}"
        r = fleet.fleetctl("status", "--json", "--connect-timeout", "10")
        assert r.returncode == 0, r.stderr
        assert [h["host"] for h in json.loads(r.stdout)] == ["web1"]


def test_usage_and_input_errors_give_exit_2(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"web1": ["web"]})
    cases = [
        (["deploy", "web9", "--system", SYSTEM], "did you mean web1"),
        (["deploy", "web1"], "--system"),
        (["deploy", "web1", "--system", SYSTEM, "--batch", "ten"], "--batch"),
        (["deploy", "web1", "--system", SYSTEM, "--broker", "http://x"], "scheme"),
        (["deploy", "web1", "--system", SYSTEM, "--choose", "nonsense"], "STEP.ITEM=CHOICE"),
        (["deploy", "web1", "--system", SYSTEM, "--inventory", "/nonexistent.toml"],
         "not found"),
    ]
    for args, fragment in cases:
        r = fleet.fleetctl(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert fragment in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    fleet.inventory.write_text("[hosts.web1\n")
    r = fleet.fleetctl("status")
    assert r.returncode == 2 and "invalid TOML" in r.stderr


def test_keys_init_creates_private_key_0600(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    d = tmp_path / "state"
    r = subprocess.run([sys.executable, "-m", "controller", "keys", "init", "--state-dir", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (d / "controller.key").stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in (d / "controller.pub").read_bytes()
    r = subprocess.run([sys.executable, "-m", "controller", "keys", "init", "--state-dir", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "exists already" in r.stderr


def test_confirm_controller_mode_succeeds_when_the_controller_answers(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet({"c1": ["x"], "c2": ["x"]})
    fleet.start_simulated(["c1", "c2"])
    rc, out = fleet.fleetctl_json("deploy", "@x", "--system", SYSTEM, "--confirm", "controller",
                                  "--confirm-timeout", "10")
    assert rc == 0 and out["succeeded"] == 2, out
    for host in ("c1", "c2"):
        assert any(r["kind"] == "end" and r.get("stage") == "confirm" for r in fleet.journal(host))
