"""Issue 11 item 8: the journal refuses mid-file corruption; a torn last record is cut off.

`scan` is pure and table-tested; `Journal.open`, `repair_records` and the
`fleet-agent journal check|repair` commands run against real files.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client.journal import Journal, needs_sync, repair_records, scan
from protocol.errors import StateError

REPO = Path(__file__).resolve().parents[1]


def rec(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}).encode() + b"\n"


ACCEPT = rec("accept", deployment_id="d1", generation=3,
             desired=base64.b64encode(b"x").decode())
FETCH = rec("begin", deployment_id="d1", stage="fetch")
FETCHED = rec("end", deployment_id="d1", stage="fetch", data="/sys/new")
BEGIN_A = rec("begin", deployment_id="d1", stage="step:a")
END_A = rec("end", deployment_id="d1", stage="step:a", data={"status": "ok"})
START = rec("start")

# (name, journal bytes, numbers of corrupt records, numbers of torn records)
CASES = [
    ("clean", START + ACCEPT + FETCH, [], []),
    ("empty", b"", [], []),
    ("torn last record", START + ACCEPT + FETCH[:-9], [], [3]),
    ("a torn record that parses is still torn", START + ACCEPT.rstrip(b"\n"), [], [2]),
    ("garbage in the middle", START + b"{\"kind\": \"begi\x00\n" + ACCEPT, [2], []),
    ("complete but unreadable last record", START + ACCEPT + b"not json\n", [3], []),
    ("well-formed JSON, wrong fields", START + rec("begin", stage=5) + ACCEPT, [2], []),
    ("corrupt and torn", START + b"]\n" + ACCEPT + b"{\"kin", [2], [4]),
    ("blank lines are no records", START + b"\n  \n" + ACCEPT, [], []),
]


@pytest.mark.parametrize(("raw", "corrupt", "torn"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_scan(raw: bytes, corrupt: list[int], torn: list[int]) -> None:
    found = scan(raw)
    assert [ln.number for ln in found.corrupt] == corrupt
    assert [ln.number for ln in found.torn] == torn
    assert found.good_bytes == raw.rfind(b"\n") + 1


def test_open_refuses_mid_file_corruption_naming_the_record(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    raw = START + ACCEPT + FETCH + FETCHED + b'{"kind":"begin","deployment_id":"d1","st\n' \
        + END_A
    journal.write_bytes(raw)
    with pytest.raises(StateError) as err:
        Journal(tmp_path).open()
    message = str(err.value)
    assert "\n" not in message
    assert "corrupt at record 5 (byte" in message
    assert "1 readable record(s) after it" in message
    assert f"fleet-agent journal repair --state-dir {tmp_path}" in message
    assert journal.read_bytes() == raw  # nothing cut, nothing lost


def test_open_cuts_a_torn_last_record(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(START + ACCEPT + BEGIN_A[:20])
    j = Journal(tmp_path)
    state = j.open()
    j.close()
    assert state.torn_lines == 1 and state.active is not None
    assert journal.read_bytes() == START + ACCEPT


def test_a_zero_byte_journal_is_a_fresh_host_and_takes_the_next_record(tmp_path: Path) -> None:
    """0 bytes is what a crash before the first fdatasync leaves (the agent's first record,
    `start`, is synced before it goes on): nothing was committed, the host starts fresh
    and its records land at the start of the file."""
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(b"")
    j = Journal(tmp_path)
    state = j.open()
    assert (state.starts, state.generation, state.active, state.torn_lines) == (0, 0, None, 0)
    j.append("start")
    j.append("accept", deployment_id="d1", generation=1, desired=base64.b64encode(b"x").decode())
    j.close()
    assert [json.loads(ln)["kind"] for ln in journal.read_bytes().splitlines()] == \
        ["start", "accept"]
    again = Journal(tmp_path)
    state = again.open()
    again.close()
    assert state.starts == 1 and state.active is not None and state.active.generation == 1


def test_repair_never_turns_a_lost_record_into_done() -> None:
    """The lost record was `begin step:a` of the running deployment: after repair every
    step not recorded as done counts as begun (interrupted), none as done."""
    raw = START + ACCEPT + FETCH + FETCHED + b"\x00garbage\n" + rec("start")
    kept, said = repair_records(scan(raw), lambda top: ["a", "b"] if top == "/sys/new" else [])
    added = [r for r in kept if r.get("repaired")]
    assert [(r["kind"], r["stage"]) for r in added] == [("begin", "step:a"), ("begin", "step:b")]
    assert not any(r["kind"] == "end" and r.get("stage", "").startswith("step:") for r in kept)
    assert kept[-1] == {"kind": "note", "deployment_id": "d1", "key": "journal_repaired",
                        "value": 5}
    assert said[0].startswith("dropped record 5") and "deployment d1" in said[0]
    assert "count as interrupted: a, b" in said[1]


def test_repair_keeps_a_step_recorded_as_done_done() -> None:
    raw = START + ACCEPT + FETCH + FETCHED + BEGIN_A + END_A + b"garbage\n" + START
    kept, _ = repair_records(scan(raw), lambda top: ["a", "b"])
    assert [r["stage"] for r in kept if r.get("repaired")] == ["step:b"]


def test_repair_of_a_finished_deployment_adds_nothing() -> None:
    raw = START + ACCEPT + b"garbage\n" + rec("result", deployment_id="d1", generation=3,
                                               status="succeeded", system="/s")
    kept, said = repair_records(scan(raw), lambda top: ["a"])
    assert len(kept) == 3 and not any(r.get("repaired") for r in kept)
    assert said == ["dropped record 3 (Expecting value: line 1 column 1 (char 0)); "
                    "deployment d1 at that point"]


def test_repair_refuses_when_the_accept_itself_is_lost() -> None:
    raw = START + b"garbage\n" + FETCH + FETCHED
    with pytest.raises(StateError, match="accepting deployment d1 is lost"):
        repair_records(scan(raw), lambda top: [])


def fleet_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_journal_check_and_repair_commands(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    original = START + ACCEPT + b"\xff\xfe\n" + FETCH
    journal.write_bytes(original)
    r = fleet_agent("journal", "check", "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert "record 3 (byte" in r.stdout and "is corrupt" in r.stdout
    r = fleet_agent("journal", "repair", "--state-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "dropped record 3" in r.stdout
    [aside] = tmp_path.glob("journal.jsonl.corrupt-*")
    assert aside.read_bytes() == original
    r = fleet_agent("journal", "check", "--state-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout
    assert "deployment d1 (generation 3) in progress" in r.stdout
    r = fleet_agent("journal", "repair", "--state-dir", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.startswith("fleet-agent: error: cannot read journal")
    assert "Traceback" not in r.stderr


SYNC_CASES = [
    ({"kind": "accept"}, True),
    ({"kind": "start"}, True),
    ({"kind": "begin", "stage": "fetch"}, False),
    ({"kind": "end", "stage": "fetch"}, False),
    ({"kind": "begin", "stage": "check"}, False),
    ({"kind": "end", "stage": "dry-activate"}, False),
    ({"kind": "begin", "stage": "confirm"}, False),
    ({"kind": "begin", "stage": "dump"}, True),
    ({"kind": "begin", "stage": "switch"}, True),
    ({"kind": "end", "stage": "switch"}, True),
    ({"kind": "begin", "stage": "step:db"}, True),
    ({"kind": "end", "stage": "step:db"}, True),
    ({"kind": "begin", "stage": "rollback"}, True),
    ({"kind": "note", "key": "confirm_deadline"}, False),
    ({"kind": "note", "key": "cancel"}, True),
    ({"kind": "note", "key": "error"}, True),
    ({"kind": "prompt"}, True),
    ({"kind": "answer"}, True),
    ({"kind": "reset"}, True),
    ({"kind": "result"}, True),
]


@pytest.mark.parametrize(("rec", "sync"), SYNC_CASES)
def test_which_records_are_synced_before_the_agent_goes_on(rec: dict[str, Any],
                                                           sync: bool) -> None:
    assert needs_sync(rec) is sync


def test_a_quick_deploy_syncs_four_times_and_every_record_is_written_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: repeatable stages wait for the next synced record, yet every record
    is in the file (for the agent's next start) as soon as append returns."""
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    j = Journal(tmp_path)
    j.open()
    j.append("accept", deployment_id="d1", generation=1,
             desired=base64.b64encode(b"x").decode(), previous=None)
    for stage in ("fetch", "check"):
        j.append("begin", deployment_id="d1", stage=stage)
        j.append("end", deployment_id="d1", stage=stage, data=None)
    j.append("begin", deployment_id="d1", stage="switch")
    assert len(syncs) == 2
    replayed = Journal(tmp_path)
    assert replayed.open().active is not None
    assert replayed.state.active.done.keys() == {"fetch", "check"}  # type: ignore[union-attr]
    assert "switch" in replayed.state.active.started  # type: ignore[union-attr]
    replayed.close()
    j.append("end", deployment_id="d1", stage="switch", data={})
    for kind in ("begin", "end"):
        j.append(kind, deployment_id="d1", stage="confirm")
    j.append("result", deployment_id="d1", generation=1, status="succeeded")
    assert len(syncs) == 4  # accept, switch begun, switch ended, result
    j.close()


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every fsync / fdatasync, in order (what a crash would keep)."""
    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def wrapped(fd: int, real: Any = real) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)
        monkeypatch.setattr(os, name, wrapped)
    return synced


def test_a_new_journal_s_name_is_durable_before_its_first_record_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync makes a file's data durable, not its directory entry: a crash after the
    first record's fdatasync could lose the new journal, records and all, and the host
    would start afresh (run a deployment again)."""
    synced = _record_syncs(monkeypatch)
    j = Journal(tmp_path)
    j.open()
    j.append("start")
    j.close()
    journal = str(tmp_path / "journal.jsonl")
    assert str(tmp_path) in synced and journal in synced
    assert synced.index(str(tmp_path)) < synced.index(journal), synced
    synced.clear()
    Journal(tmp_path).open()  # an existing journal: nothing new to make durable
    assert str(tmp_path) not in synced


def test_a_repaired_journal_s_rename_is_durable(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from client.journal import repair_file
    (tmp_path / "journal.jsonl").write_bytes(START + b"#garbage\n" + START)
    synced = _record_syncs(monkeypatch)
    repair_file(tmp_path / "journal.jsonl", lambda _d: [])
    assert synced and synced[-1] == str(tmp_path), synced
