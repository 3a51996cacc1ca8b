"""The controller's JSON-Patch event log: replay, torn lines, corruption, compaction,
concurrent writers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.follow.view import seen_generation
from controller.state import store
from controller.state.eventlog import PATCH_ERRORS, EventLog, apply_patch
from controller.state.shape import DOC_TYPE
from protocol.errors import StateError
from protocol.models import MAX_GENERATION, Desired, HostState


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def populate(log: EventLog, hosts: int = 5) -> None:
    """A realistic history: create a rollout, start hosts, record results, finish."""
    names = [f"web{i}" for i in range(hosts)]
    with log.transaction() as txn:
        txn.add("rollout-created", store.create_rollout(
            txn.doc, "r1", "@web", "/nix/store/a", "switch", {"rollout": {}}, [names]))
    with log.transaction() as txn:
        for h in names:
            txn.add("host-started", store.start_host(txn.doc, "r1", h, 1, now=10.0)[2])
    log.append_many([(f"host-{s}", store.host_update(log.doc, "r1", h, s, "msg", "/nix/store/a"))
                     for h, s in zip(names, ["succeeded", "failed"] * hosts, strict=False)])
    log.append("rollout-finished", store.finish_rollout("r1", "failed"))


def test_replay_equals_the_in_memory_document(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    populate(log)
    # Independently replay the file with jsonpatch: same document as the writer holds.
    doc: Any = {}
    entries = lines(log.path)
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert all(set(e) == {"index", "meta", "patch"} and set(e["meta"]) == {"time", "event"}
               for e in entries)
    for e in entries:
        doc = jsonpatch.apply_patch(doc, e["patch"])
    assert doc == log.doc
    assert doc["_type"] == DOC_TYPE
    assert EventLog(tmp_path).load() == log.doc
    r = doc["rollouts"]["r1"]
    assert r["status"] == "failed"
    assert [h["result"] for h in r["hosts"].values()] == ["succeeded", "failed"] * 2 + \
        ["succeeded"]
    assert doc["hosts"]["web0"] == {"generation": 1, "deployment_id": "r1", "rollout_id": "r1",
                                    "result": "succeeded", "system": "/nix/store/a"}


def test_group_commit_is_one_write(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append("a", [{"op": "add", "path": "/x", "value": 1}])
    size = log.path.stat().st_size
    log.append_many([("b", [{"op": "add", "path": f"/y{i}", "value": i}]) for i in range(50)]
                    + [("empty", [])])
    assert len(lines(log.path)) == 2 + 50  # init + a + 50; the empty patch is dropped
    assert log.path.stat().st_size > size and log.index == 51


def test_torn_last_line_is_ignored_reported_and_cut(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    log = EventLog(tmp_path)
    populate(log)
    good = dict(log.doc)
    with open(log.path, "ab") as fh:
        fh.write(b'{"index": 99, "meta": {"time": 1, "ev')  # crash mid-write
    reader = EventLog(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert reader.load() == good
    assert reader.torn is not None and "torn last line" in reader.torn
    assert any("torn last line" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a follower (the dashboard polls) is told once
        assert reader.refresh() == good and reader.refresh() == good
    assert reader.torn is not None and caplog.records == []
    # The next append cuts the torn tail and stays line-aligned.
    reader.append("after-crash", store.set_rollout_field("r1", "note", "hello"))
    assert reader.torn is None
    entries = lines(tmp_path / "state.jsonl")
    assert [e["index"] for e in entries] == list(range(len(entries)))
    again = EventLog(tmp_path).load()
    assert again["rollouts"]["r1"]["note"] == "hello"
    # The original writer (stale offset, same file) catches up too.
    log.refresh()
    assert log.doc == again


SHAPE_BREAKING = [  # parse, and (but for the first four) apply: yet break the document
    b'{"index": 3, "patch": "x"}', b'{"index": 3, "patch": [1]}', b'[3]',
    b'{"index": 3, "patch": [{"op": "add"}]}',
    b'{"index": 3, "patch": [{"op": "replace", "path": "/rollouts", "value": []}]}',
    b'{"index": 3, "patch": [{"op": "replace", "path": "/hosts/web0", "value": "x"}]}',
    b'{"index": 3, "patch": [{"op": "replace", "path": "/rollouts/r1/hosts", "value": 5}]}',
    b'{"index": 3, "patch": [{"op": "replace", "path": "/rollouts/r1/created", "value": "x"}]}',
    b'{"index": 3, "patch": [{"op": "replace", "path": "/rollouts/r1/hosts/web1/batch", '
    b'"value": "1"}]}',
    b'{"index": 3, "patch": [{"op": "remove", "path": "/rollouts/r1/id"}]}',
    b'{"index": 3, "patch": [{"op": "remove", "path": "/hosts"}]}',
    b'{"index": 3, "patch": [{"op": "add", "path": "/rollouts/r2", "value": {"id": "r1", '
    b'"status": "running", "hosts": {}}}]}',
]


@pytest.mark.parametrize("garbage", [b"not json at all", b'{"index": 7, "patch": []}',
                                     b'{"index": 3, "patch": [{"op": "remove", '
                                     b'"path": "/nope"}]}', *SHAPE_BREAKING])
def test_corrupt_middle_line_is_a_clear_state_error(tmp_path: Path, garbage: bytes) -> None:
    log = EventLog(tmp_path)
    populate(log)
    raw = log.path.read_bytes().split(b"\n")
    raw[3] = garbage
    log.path.write_bytes(b"\n".join(raw))
    with pytest.raises(StateError) as exc:
        EventLog(tmp_path).load()
    message = str(exc.value)
    assert "corrupt" in message and str(log.path) in message and "\n" not in message
    assert "after index 2" in message


@pytest.mark.parametrize("garbage", SHAPE_BREAKING)
def test_an_entry_that_breaks_the_document_is_refused_on_append(tmp_path: Path,
                                                                garbage: bytes) -> None:
    log = EventLog(tmp_path)
    populate(log)
    size, entry = log.path.stat().st_size, json.loads(garbage)
    patch = entry["patch"] if isinstance(entry, dict) else entry
    with pytest.raises(StateError, match="invalid patch"):
        log.append("bad", patch)
    assert log.path.stat().st_size == size
    assert EventLog(tmp_path).load() == log.load()  # the log is as good as before


def test_index_zero_must_set_the_type(tmp_path: Path) -> None:
    (tmp_path / "state.jsonl").write_text(json.dumps(
        {"index": 0, "meta": {"time": 0, "event": "init"},
         "patch": [{"op": "replace", "path": "", "value": {"hello": 1}}]}) + "\n")
    with pytest.raises(StateError, match="corrupt"):
        EventLog(tmp_path).load()


def test_an_invalid_patch_never_reaches_the_file(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    populate(log)
    size = log.path.stat().st_size
    with pytest.raises(StateError, match="invalid patch"):
        log.append("bad", [{"op": "replace", "path": "/rollouts/nope/status", "value": 1}])
    assert log.path.stat().st_size == size
    log.append("good", store.set_rollout_field("r1", "ok", True))  # the log still works
    assert EventLog(tmp_path).load()["rollouts"]["r1"]["ok"] is True


def test_compaction_is_equivalent(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    populate(log, hosts=20)
    before = json.loads(json.dumps(log.doc))
    entries_before = len(lines(log.path))
    stale = EventLog(tmp_path)
    stale.load()
    count, saved = EventLog(tmp_path).compact()
    assert count == entries_before and saved > 0
    entries = lines(log.path)
    assert len(entries) == 1 and entries[0]["index"] == 0
    assert entries[0]["meta"]["event"] == "snapshot"
    assert EventLog(tmp_path).load() == before
    # A process holding a stale offset notices the replaced file and re-reads it.
    stale.refresh()
    assert stale.doc == before and stale.index == 0
    # Later appends continue at index 1, from either process.
    stale.append("after", store.set_rollout_field("r1", "after_compaction", 1))
    log.append("after2", store.set_rollout_field("r1", "after_compaction_2", 2))
    assert [e["index"] for e in lines(log.path)] == [0, 1, 2]
    final = EventLog(tmp_path).load()
    assert final["rollouts"]["r1"]["after_compaction"] == 1
    assert final["rollouts"]["r1"]["after_compaction_2"] == 2
    assert final["rollouts"]["r1"]["hosts"] == before["rollouts"]["r1"]["hosts"]
    assert not (tmp_path / "state.jsonl.tmp").exists()


def test_stale_reader_after_two_compactions(tmp_path: Path) -> None:
    """Even if the file is replaced twice (inode numbers can be reused), a reader whose
    offset points into the old file re-reads instead of misparsing."""
    log = EventLog(tmp_path)
    populate(log)
    stale = EventLog(tmp_path)
    stale.load()
    for i in range(2):
        EventLog(tmp_path).compact()
        EventLog(tmp_path).append(f"n{i}", store.set_rollout_field("r1", f"n{i}", i))
    stale.refresh()
    assert stale.doc == EventLog(tmp_path).load()


def test_compacting_an_empty_state_dir(tmp_path: Path) -> None:
    assert EventLog(tmp_path / "new").compact() == (0, 0)


def _writer(state_dir: str, name: str, n: int) -> None:
    log = EventLog(Path(state_dir))
    for i in range(n):
        with log.transaction() as txn:
            # read-modify-write under the lock: a counter nobody may lose
            count = txn.doc.get("counter", 0)
            txn.add(f"{name}-{i}", [{"op": "add", "path": "/counter", "value": count + 1},
                                    {"op": "add", "path": f"/{name}{i}", "value": os.getpid()}])


def test_concurrent_writers_are_serialised(tmp_path: Path) -> None:
    n = 150
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), name, n)) for name in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = lines(tmp_path / "state.jsonl")
    assert [e["index"] for e in entries] == list(range(2 * n + 1))  # init + 2n, contiguous
    doc = EventLog(tmp_path).load()
    assert doc["counter"] == 2 * n  # no lost update
    assert all(f"{name}{i}" in doc for name in "ab" for i in range(n))
    assert len({doc["a0"], doc["b0"]}) == 2  # really two processes


def test_generations_are_unique_across_processes(tmp_path: Path) -> None:
    """Two controllers starting the same host never hand out the same generation."""
    ctx = multiprocessing.get_context("spawn")
    log = EventLog(tmp_path)
    with log.transaction() as txn:
        for rid in ("ra", "rb"):
            txn.add("create", store.create_rollout(txn.doc, rid, "h", "/s", "switch", {},
                                                   [["h1"]]))
    procs = [ctx.Process(target=_start_many, args=(str(tmp_path), rid, 40)) for rid in ("ra", "rb")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    generations = [op["value"] for e in lines(log.path) for op in e["patch"]
                   if op["path"] == "/hosts/h1"]
    generations = [g["generation"] for g in generations]
    assert sorted(generations) == list(range(1, 81))


def _state(generation: int, desired_generation: int) -> HostState:
    return HostState(host="h", generation=generation, desired_generation=desired_generation,
                     updated_at=1.0)


def _desired(generation: int) -> Desired:
    return Desired(host="h", deployment_id=f"r{generation}", generation=generation,
                   system="/nix/store/x-sys", issued_at=1.0)


# (case, the log's generation for h, its retained state, its retained desired, the next)
GENERATION_CASES: list[tuple[str, int, HostState | None, Desired | None, int]] = [
    ("a new host the broker knows nothing of", 0, None, None, 1),
    ("the broker holds nothing (never seen, cleared): the log's next", 4, None, None, 5),
    ("log and broker agree", 2, _state(2, 2), _desired(2), 3),
    ("a restored older log: above what the host took", 1, _state(2, 2), _desired(2), 3),
    ("a finished check: its state names the deploy before, its desired the check",
     1, _state(2, 2), _desired(3), 4),
    ("a rollback: the installed generation went back, the desired one did not",
     1, _state(1, 4), None, 5),
    ("the host never reported: its retained desired still counts", 1, None, _desired(3), 4),
    ("the log is ahead of an offline host's old state", 6, _state(3, 3), None, 7),
]


@pytest.mark.parametrize(("case", "logged", "state", "desired", "expected"), GENERATION_CASES,
                         ids=[c[0] for c in GENERATION_CASES])
def test_a_host_is_given_a_generation_above_the_log_and_the_broker(
        case: str, logged: int, state: HostState | None, desired: Desired | None,
        expected: int) -> None:
    seen = max((seen_generation(m) for m in (state, desired) if m is not None), default=0)
    doc: dict[str, Any] = {"hosts": {"h": {"generation": logged}} if logged else {},
                           "rollouts": {"r9": {"policy": {}, "hosts": {"h": {}}}}}
    _, generation, patch = store.start_host(doc, "r9", "h", 1, now=1.0, seen=seen)
    assert generation == expected
    # recorded as the host's and as its rollout's generation
    assert [op["value"]["generation"] for op in patch] == [expected, expected]


def test_a_host_whose_broker_state_claims_the_last_generation_is_refused_by_name() -> None:
    doc: dict[str, Any] = {"hosts": {}, "rollouts": {"r9": {"policy": {}, "hosts": {"h": {}}}}}
    last = _state(MAX_GENERATION, MAX_GENERATION)  # the largest the codec lets through
    with pytest.raises(StateError, match=r"host 'h'.*retained state"):
        store.start_host(doc, "r9", "h", 1, now=1.0, seen=seen_generation(last))


def _start_many(state_dir: str, rid: str, n: int) -> None:
    log = EventLog(Path(state_dir))
    for i in range(n):
        with log.transaction() as txn:
            txn.add("host-started", store.start_host(txn.doc, rid, "h1", i + 1)[2])


_keys = st.sampled_from(["a", "b", "c/d", "e~f", "0", "-"])
_values = st.recursive(st.none() | st.integers() | st.text(max_size=3),
                       lambda inner: st.lists(inner, max_size=2)
                       | st.dictionaries(_keys, inner, max_size=3), max_leaves=6)
_docs = st.dictionaries(_keys, _values, max_size=4)
_ops = st.builds(
    lambda op, parts, value: {"op": op, "path": "".join(
        "/" + p.replace("~", "~0").replace("/", "~1") for p in parts), "value": value},
    st.sampled_from(["add", "replace", "remove"]),
    st.lists(_keys | st.sampled_from(["0", "1"]), min_size=0, max_size=3), _values)


@settings(max_examples=100, deadline=None)
@given(doc=_docs, patch=st.lists(_ops, max_size=4))
def test_apply_patch_is_rfc6902_like_jsonpatch(doc: dict[str, Any], patch: list[Any]) -> None:
    """The event log's fast path for member adds and replaces gives what jsonpatch gives:
    the same document, or the same error (after the same operations applied)."""
    import copy
    mine, theirs = copy.deepcopy(doc), copy.deepcopy(doc)
    try:
        want: Any = jsonpatch.JsonPatch(patch).apply(theirs, in_place=True)
    except PATCH_ERRORS as exc:
        want = type(exc)
    try:
        got: Any = apply_patch(mine, patch)
    except PATCH_ERRORS as exc:
        got = type(exc)
    assert got == want and mine == theirs
    for op in patch:  # never shares a mutable value with the patch
        if isinstance(op["value"], (dict, list)) and isinstance(got, dict):
            assert all(v is not op["value"] for v in got.values())


def test_a_new_log_s_name_is_durable_with_its_first_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync makes the file's data durable, not its directory entry: a crash after the
    first append could lose state.jsonl, every rollout in it included."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    log = EventLog(tmp_path)
    log.append("first", [{"op": "add", "path": "/x", "value": 1}])
    assert synced[:2] == [str(log.path), str(tmp_path)], synced  # the init entry, its name
    synced.clear()
    log.append("second", [{"op": "add", "path": "/y", "value": 2}])
    assert synced == [str(log.path)]  # the name is durable already: one fsync per append
