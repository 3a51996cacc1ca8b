"""The agent's durable journal: append-only JSON lines, on disk before acting.

Every transition is written here *before* its side effect starts and marked done
after, so a crash or reboot resumes at the first step not marked done. A torn last
record (crash mid-write: no newline yet) is cut off. An unreadable complete record is
corruption, not a crash (each record and its newline go in one write): the agent
refuses to start (one line naming the record) rather than guess what was done;
`fleet-agent journal check` shows the damage and `repair` sets the file aside and keeps
what is readable, conservatively (`repair_records`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.durable import fsync_dir
from protocol.errors import StateError

log = logging.getLogger(__name__)
JOURNAL_NAME = "journal.jsonl"
RESERVE_NAME = "journal.reserve"
RESERVE_BYTES = 64 * 1024
# Stages that may simply run again after a crash: their begin/end records need not be on
# disk before the agent goes on (see `needs_sync`).
REPEATABLE_STAGES = frozenset({"fetch", "check", "dry-activate", "confirm"})
LAZY_NOTES = frozenset({"confirm_deadline"})


def needs_sync(rec: dict[str, Any]) -> bool:
    """Must this record be on disk before the agent acts on it?

    Every record is written at once, in order; fdatasync is what costs. A record of a
    repeatable stage (fetch, check, dry-activate, confirm) or a note a restart recomputes
    may wait for the next synced record (group commit): losing it in a crash only means
    that stage runs again, as if the crash had come a moment earlier. Everything else
    (accepting a desired state, beginning or ending a stage that changes the host,
    prompts, answers, results) is synced before `append` returns, and with it every
    record before it."""
    kind = rec["kind"]
    if kind in ("begin", "end"):
        return rec.get("stage") not in REPEATABLE_STAGES
    if kind == "note":
        return rec.get("key") not in LAZY_NOTES
    return True


@dataclass
class RecordedResult:
    deployment_id: str
    generation: int
    status: str
    message: str = ""
    system: str | None = None
    needs_reboot: bool = False


@dataclass
class ActiveDeployment:
    """What the journal knows of the deployment in flight."""

    deployment_id: str
    generation: int
    desired: bytes
    previous_system: str | None
    previous_generation: int = 0
    started: set[str] = field(default_factory=set)
    done: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    answer_sources: dict[str, str] = field(default_factory=dict)
    prompts: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompt_answers: dict[str, dict[str, str]] = field(default_factory=dict)
    closed_prompts: set[str] = field(default_factory=set)
    step_runs: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class JournalState:
    """The agent's view of its host, rebuilt by replaying the journal."""

    starts: int = 0
    generation: int = 0
    system: str | None = None
    highest_generation: int = 0
    active: ActiveDeployment | None = None
    results: dict[str, RecordedResult] = field(default_factory=dict)
    last_result: RecordedResult | None = None
    last_deployment: ActiveDeployment | None = None
    torn_lines: int = 0

    def apply(self, rec: dict[str, Any]) -> None:
        kind = rec["kind"]
        a = self.active
        if kind == "start":
            self.starts += 1
        elif kind == "accept":
            self.active = ActiveDeployment(
                deployment_id=rec["deployment_id"], generation=rec["generation"],
                desired=base64.b64decode(rec["desired"]), previous_system=rec.get("previous"),
                previous_generation=rec.get("previous_generation", self.generation),
            )
            self.highest_generation = max(self.highest_generation, rec["generation"])
        elif kind == "result":
            r = RecordedResult(
                deployment_id=rec["deployment_id"], generation=rec["generation"],
                status=rec["status"], message=rec.get("message", ""),
                system=rec.get("system"), needs_reboot=rec.get("needs_reboot", False),
            )
            self.results[r.deployment_id] = r
            if not rec.get("check_only"):  # the host's status is its last deploy's
                self.last_result = r
            self.highest_generation = max(self.highest_generation, r.generation)
            if rec.get("installed") is not None:
                # A rollback names what the host runs now, even "nothing we deployed".
                self.system, self.generation = r.system, rec["installed"]
            elif r.status == "succeeded" and r.system is not None:
                self.system, self.generation = r.system, r.generation
            if a is not None and a.deployment_id == r.deployment_id:
                if "switch" in a.started or "rollback-previous" in a.started:
                    # what `fleetctl rollback` undoes: the last deployment that changed
                    # something (not one cancelled, blocked or only checked before that)
                    self.last_deployment = a
                self.active = None
        elif a is None or rec.get("deployment_id") != a.deployment_id:
            return
        elif kind == "begin":
            a.started.add(rec["stage"])
            if rec["stage"].startswith("step:"):
                a.step_runs[rec["stage"]] = a.step_runs.get(rec["stage"], 0) + 1
        elif kind == "end":
            a.done[rec["stage"]] = rec.get("data")
        elif kind == "reset":
            for stage in rec.get("stages", []):
                a.started.discard(stage)
                a.done.pop(stage, None)
            for note in rec.get("notes", []):
                a.notes.pop(note, None)
        elif kind == "prompt":
            a.prompts[rec["prompt_id"]] = rec["prompt"]
        elif kind == "answer":
            a.answers.update(rec["choices"])
            a.prompt_answers.setdefault(rec["prompt_id"], {}).update(rec["choices"])
            for key in rec["choices"]:
                a.answer_sources[key] = rec.get("source", "")
            if rec.get("deferred_until") is not None:
                a.notes["deferred_until"] = rec["deferred_until"]
            if rec.get("complete", True):
                a.closed_prompts.add(rec["prompt_id"])
        elif kind == "note":
            a.notes[rec["key"]] = rec["value"]


# Field types JournalState.apply relies on, per record kind. A record that does not
# have them is skipped whole (counted as torn), never half-applied.
_REQUIRED: dict[str, dict[str, type]] = {
    "accept": {"deployment_id": str, "generation": int, "desired": str},
    "result": {"deployment_id": str, "generation": int, "status": str},
    "begin": {"stage": str},
    "end": {"stage": str},
    "reset": {"stages": list},
    "prompt": {"prompt_id": str, "prompt": dict},
    "answer": {"prompt_id": str, "choices": dict},
    "note": {"key": str},
}
_OPTIONAL: dict[str, dict[str, tuple[type, ...]]] = {
    "accept": {"previous": (str, type(None)), "previous_generation": (int,)},
    "result": {"message": (str,), "system": (str, type(None)), "needs_reboot": (bool,),
               "installed": (int,), "check_only": (bool,)},
    "answer": {"source": (str,), "deferred_until": (int, float, type(None))},
}


def check_record(rec: Any) -> None:
    """Raise ValueError unless `rec` is a record JournalState.apply can apply whole."""
    if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
        raise ValueError("not a record")
    kind = rec["kind"]
    if "deployment_id" in rec and not isinstance(rec["deployment_id"], str):
        raise ValueError(f"{kind} record: deployment_id is not a string")
    for name, typ in _REQUIRED.get(kind, {}).items():
        value = rec.get(name)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{kind} record: {name} is not a {typ.__name__}")
    for name, types in _OPTIONAL.get(kind, {}).items():
        if name in rec and not isinstance(rec[name], types):
            raise ValueError(f"{kind} record: bad {name}")
    if kind == "reset" and not all(isinstance(s, str) for s in rec["stages"]):
        raise ValueError("reset record: stages are not strings")
    if kind == "answer" and not all(isinstance(v, str) for v in rec["choices"].values()):
        raise ValueError("answer record: choices are not strings")
    if kind == "accept":
        base64.b64decode(rec["desired"], validate=True)  # binascii.Error is a ValueError


@dataclass(frozen=True)
class Line:
    """One journal line: its record, or why it cannot be trusted."""

    number: int  # 1-based
    offset: int  # byte offset in the file
    record: dict[str, Any] | None
    error: str = ""
    torn: bool = False  # the unterminated end of the file


@dataclass(frozen=True)
class Scan:
    lines: list[Line]
    good_bytes: int  # the file up to and including its last newline

    @property
    def corrupt(self) -> list[Line]:
        """Unreadable complete (newline-terminated) records. Each record is written with
        its newline in one write, fsynced: a crash mid-write leaves no newline."""
        return [ln for ln in self.lines if ln.record is None and not ln.torn]

    @property
    def torn(self) -> list[Line]:
        return [ln for ln in self.lines if ln.torn]


def scan(raw: bytes) -> Scan:
    """Every line of a journal file, parsed and checked (pure). The part after the last
    newline is a torn record (never trusted, even when it parses)."""
    *complete, tail = raw.split(b"\n")
    lines: list[Line] = []
    offset = 0
    for number, text in enumerate(complete, start=1):
        if text.strip():
            try:
                rec = json.loads(text)
                check_record(rec)
                lines.append(Line(number, offset, rec))
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                lines.append(Line(number, offset, None, str(exc)[:200]))
        offset += len(text) + 1
    if tail:
        lines.append(Line(len(complete) + 1, offset, None,
                          f"torn ({len(tail)} bytes, no newline)", torn=True))
    return Scan(lines, offset)


def corruption_error(path: Path, found: Scan) -> StateError:
    first = found.corrupt[0]
    after = sum(1 for ln in found.lines if ln.record is not None and ln.number > first.number)
    state_dir = path.parent
    return StateError(
        f"journal {path} is corrupt at record {first.number} (byte {first.offset}: "
        f"{first.error}) with {after} readable record(s) after it; refusing to guess what "
        f"was done. See `fleet-agent journal check --state-dir {state_dir}`; "
        f"`fleet-agent journal repair --state-dir {state_dir}` sets it aside and keeps the "
        "readable records (steps not recorded as done count as interrupted)")


def repair_records(found: Scan, steps_of: Callable[[str], list[str]]
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """The records a repaired journal keeps, plus conservative additions, and what was
    done (one line each). Nothing unreadable becomes "done": the deployment that was
    running where a record was lost gets every step not recorded as done marked begun,
    so on resume idempotent steps run again and the others are failures the operator
    resolves (retry, skip, roll back); a lost record is never assumed harmless."""
    kept: list[dict[str, Any]] = []
    said: list[str] = []
    state = JournalState()
    suspects: dict[str, int] = {}  # deployment id -> first lost record's number
    for ln in found.lines:
        if ln.record is None:
            a = state.active
            where = f"deployment {a.deployment_id}" if a else "no deployment running"
            said.append(f"dropped record {ln.number} ({ln.error}); {where} at that point")
            if a is not None:
                suspects.setdefault(a.deployment_id, ln.number)
            continue
        kept.append(ln.record)
        state.apply(ln.record)
    a = state.active
    if a is not None and a.deployment_id in suspects:
        toplevel = a.done.get("fetch")
        names = steps_of(toplevel) if isinstance(toplevel, str) else []
        for name in names:
            stage = f"step:{name}"
            if stage not in a.done and stage not in a.started:
                kept.append({"kind": "begin", "deployment_id": a.deployment_id,
                             "stage": stage, "repaired": True})
        kept.append({"kind": "note", "deployment_id": a.deployment_id,
                     "key": "journal_repaired", "value": suspects[a.deployment_id]})
        open_steps = [n for n in names if f"step:{n}" not in a.done]
        said.append(f"deployment {a.deployment_id} resumes; steps not recorded as done "
                    f"count as interrupted: {', '.join(open_steps) or '(none)'}")
    orphans = {rec.get("deployment_id") for rec in kept
               if rec.get("kind") in ("begin", "end", "prompt", "answer", "note")}
    known = {rec.get("deployment_id") for rec in kept if rec.get("kind") in ("accept", "result")}
    lost_accepts = sorted(str(d) for d in orphans - known if d is not None)
    if lost_accepts:
        raise StateError(
            f"cannot repair: the record accepting deployment {lost_accepts[0]} is lost, so "
            "its generation is unknown and the host would run it again from the start; "
            "restore the journal from a backup, or move it away to start afresh")
    return kept, said


class Journal:
    """Append-only, fsynced journal file in the agent's state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / JOURNAL_NAME
        self.reserve = state_dir / RESERVE_NAME
        self.state = JournalState()
        self._fh: Any = None

    def open(self) -> JournalState:
        """Replay the journal, drop a torn tail, and open it for appending."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            raw = self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            raise StateError(f"cannot read journal {self.path}: {exc.strerror}") from None
        # A 0-byte journal is a fresh host, like a missing one, and that loses nothing:
        # the agent's first record (`start`) is fdatasynced before it goes on, and
        # fdatasync makes the file's size durable with its data, so 0 bytes (a crash
        # before that first sync, or a lone torn record cut off) means no record was
        # ever committed.
        found = scan(raw)
        if found.corrupt:
            raise corruption_error(self.path, found)
        for ln in found.lines:
            if ln.record is not None:
                self.state.apply(ln.record)
        for ln in found.torn:
            self.state.torn_lines += 1
            log.warning("journal %s: cutting off torn last record %d (%s)", self.path,
                        ln.number, ln.error)
        good = found.good_bytes
        try:
            if good < len(raw):
                with open(self.path, "r+b") as fh:
                    fh.truncate(good)
                    os.fsync(fh.fileno())
            self._fh = open(self.path, "ab")  # noqa: SIM115 - owned for the agent's lifetime
            if not self.reserve.exists():
                # Space held back so that a full disk still lets us record why we stopped.
                with open(self.reserve, "wb") as fh:
                    fh.write(b"\0" * RESERVE_BYTES)
                    os.fsync(fh.fileno())
            if not raw:  # the journal may be new: its name must be durable before the
                fsync_dir(self.path.parent)  # first record's fdatasync counts for anything
        except OSError as exc:
            raise StateError(f"cannot open journal {self.path}: {exc.strerror}") from None
        return self.state

    def append(self, kind: str, **fields: Any) -> None:
        """Write one record (durably, with every record before it, unless `needs_sync`
        says it may wait), then apply it to the state."""
        rec = {"kind": kind, "t": round(time.time(), 6), **fields}
        line = memoryview(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
        size: int | None = None
        try:
            fd = self._fh.fileno()
            size = os.fstat(fd).st_size
            while line:  # straight to the file (O_APPEND), no buffer in between
                line = line[os.write(fd, line):]
            if needs_sync(rec):
                os.fdatasync(fd)
        except OSError as exc:
            self._undo_partial(size)
            raise StateError(f"cannot write journal {self.path}: {exc.strerror}") from None
        self.state.apply(rec)

    def _undo_partial(self, size: int | None) -> None:
        """Cut a half-written record and give back the reserve, so the next append (the
        record of why we stop) can still land on a full disk."""
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            if size is not None:
                os.truncate(self.path, size)
            self.reserve.unlink(missing_ok=True)
            self._fh = open(self.path, "ab")  # noqa: SIM115
        except OSError as exc:
            log.error("journal %s: cannot recover from a failed write: %s", self.path, exc)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def check_file(path: Path) -> tuple[bool, list[str]]:
    """`fleet-agent journal check`: (usable, report lines)."""
    try:
        found = scan(path.read_bytes())
    except FileNotFoundError:
        return True, [f"{path}: no journal yet (a fresh host)"]
    except OSError as exc:
        raise StateError(f"cannot read journal {path}: {exc.strerror}") from None
    good = sum(1 for ln in found.lines if ln.record is not None)
    out = [f"{path}: {good} readable record(s)"]
    out += [f"record {ln.number} (byte {ln.offset}) is corrupt: {ln.error}"
            for ln in found.corrupt]
    out += [f"record {ln.number} is a torn last record (cut off at start): {ln.error}"
            for ln in found.torn]
    if found.corrupt:
        out.append("the agent refuses to start on this journal; `fleet-agent journal repair`"
                   " sets it aside and keeps the readable records")
        return False, out
    state = JournalState()
    for ln in found.lines:
        if ln.record is not None:
            state.apply(ln.record)
    a = state.active
    if a is not None:
        out.append(f"deployment {a.deployment_id} (generation {a.generation}) in progress: "
                   f"done {', '.join(sorted(a.done)) or '-'}; begun, not done: "
                   f"{', '.join(sorted(a.started - set(a.done))) or '-'}")
    return True, out


def repair_file(path: Path, steps_of: Callable[[str], list[str]]) -> list[str]:
    """`fleet-agent journal repair`: the damaged file is kept as `journal.jsonl.corrupt-T`;
    the new one holds `repair_records`. Run it only while the agent is stopped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read journal {path}: {exc.strerror}") from None
    found = scan(raw)
    if not found.corrupt and not found.torn:
        return [f"{path}: nothing to repair"]
    kept, said = repair_records(found, steps_of)
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    tmp = path.with_name(path.name + ".repair")
    try:
        with open(aside, "wb") as fh:
            fh.write(raw)
            os.fsync(fh.fileno())
        with open(tmp, "wb") as fh:
            for rec in kept:
                fh.write(json.dumps(rec, separators=(",", ":"), sort_keys=True).encode()
                         + b"\n")
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StateError(f"cannot repair journal {path}: {exc.strerror}") from None
    return [*said, f"the damaged journal is kept as {aside}"]


def encode_blob(data: bytes) -> str:
    return base64.b64encode(data).decode()
