"""The agent's durable journal: append-only JSON lines, fsynced before acting.

Every transition is written here *before* its side effect starts and marked done
after, so a crash or reboot resumes at the first step not marked done. A torn last
line (crash mid-write) is ignored; a record that does not parse is never trusted.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import StateError

log = logging.getLogger(__name__)
JOURNAL_NAME = "journal.jsonl"
RESERVE_NAME = "journal.reserve"
RESERVE_BYTES = 64 * 1024


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
            self.last_result = r
            self.highest_generation = max(self.highest_generation, r.generation)
            if rec.get("installed") is not None:
                # A rollback names what the host runs now, even "nothing we deployed".
                self.system, self.generation = r.system, rec["installed"]
            elif r.status == "succeeded" and r.system is not None:
                self.system, self.generation = r.system, r.generation
            if a is not None and a.deployment_id == r.deployment_id:
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
               "installed": (int,)},
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
        *complete, tail = raw.split(b"\n")
        for i, line in enumerate(complete):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                check_record(rec)
                self.state.apply(rec)
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                self.state.torn_lines += 1
                log.warning("journal %s: ignoring unreadable record %d: %s", self.path, i + 1, exc)
        if tail:
            self.state.torn_lines += 1
            log.warning("journal %s: ignoring torn last record (%d bytes)", self.path, len(tail))
        good = len(raw) - len(tail)
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
        except OSError as exc:
            raise StateError(f"cannot open journal {self.path}: {exc.strerror}") from None
        return self.state

    def append(self, kind: str, **fields: Any) -> None:
        """Write one record durably (write + fsync), then apply it to the state."""
        rec = {"kind": kind, "t": round(time.time(), 6), **fields}
        line = json.dumps(rec, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        size: int | None = None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self._fh.write(line)
            self._fh.flush()
            os.fdatasync(self._fh.fileno())
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


def encode_blob(data: bytes) -> str:
    return base64.b64encode(data).decode()
