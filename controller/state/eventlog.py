"""The controller's state as an append-only JSON-Patch event log (NixOps4 state_file).

Each line of `STATE_DIR/state.jsonl` is `{index, meta: {time, event}, patch: [RFC 6902]}`;
index 0 initialises the document with `_type`. Replaying the patches gives the current
document. Appends are fsynced; a torn last line (crash mid-write) is ignored, reported
and cut off before the next append. Writers are serialised across processes with
`flock` on `state.lock`, and each writer first catches up on lines others appended.

Readers keep a byte offset and catch up incrementally. Compaction replaces the file
(write a snapshot as a new index-0 file, fsync, rename); a reader notices because the
inode changed, the file shrank below its offset, or the line at its offset does not
continue its index, and then replays the new file from the start.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch

from controller.state.shape import DOC_TYPE, check_entry, check_touched
from protocol.durable import fsync_dir
from protocol.errors import StateError

log = logging.getLogger(__name__)
Patch = list[dict[str, Any]]
PATCH_ERRORS = (ValueError, KeyError, TypeError, IndexError, jsonpatch.JsonPatchException,
                jsonpatch.JsonPointerException)


def initial_document() -> dict[str, Any]:
    return {"_type": DOC_TYPE, "version": 1, "hosts": {}, "rollouts": {}}


def escape(key: str) -> str:
    """JSON-Pointer escaping of one path segment."""
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, patch: Patch) -> Any:
    """RFC 6902 on `doc`, in place; returns the document. Adds and replaces of object
    members (nearly every entry the driver writes, thousands per rollout) are applied
    here; from the first other operation on, jsonpatch applies the rest (and raises its
    errors). Values are copied like jsonpatch does, so the document never shares mutable
    values with the patch."""
    for i, op in enumerate(patch):
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "replace") or not isinstance(path, str) \
                or not path.startswith("/") or "value" not in op:
            return jsonpatch.JsonPatch(patch[i:]).apply(doc, in_place=True)
        *parents, last = (_unescape(part) for part in path[1:].split("/"))
        obj = doc
        for part in parents:
            if not isinstance(obj, dict) or part not in obj:
                return jsonpatch.JsonPatch(patch[i:]).apply(doc, in_place=True)
            obj = obj[part]
        if not isinstance(obj, dict) or (kind == "replace" and last not in obj):
            return jsonpatch.JsonPatch(patch[i:]).apply(doc, in_place=True)
        value = op["value"]
        obj[last] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    return doc


def initial_document_patch() -> Patch:
    return [{"op": "replace", "path": "", "value": initial_document()}]


def _replay(patches: list[Patch]) -> dict[str, Any]:
    doc: Any = {}
    for patch in patches:
        doc = apply_patch(doc, patch)
    return doc  # type: ignore[no-any-return]


class _Replaced(Exception):
    """The file at our offset is not the one we were reading (compacted meanwhile)."""


@dataclass
class Transaction:
    """An exclusive section: read `doc` (current, including other processes' appends),
    queue entries with `add`; they are written with one write and one fsync at the end.
    Patches are applied after the write, so compute each from `doc` as it was."""

    doc: dict[str, Any]
    entries: list[tuple[str, Patch]] = field(default_factory=list)

    def add(self, event: str, patch: Patch) -> None:
        if patch:
            self.entries.append((event, patch))


@dataclass(frozen=True)
class RepairReport:
    kept: int
    skipped: list[str]
    damaged_copy: Path | None  # None: every entry was readable, nothing was rewritten


class EventLog:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.jsonl"
        self.lock_path = state_dir / "state.lock"
        self.doc: dict[str, Any] = {}
        self.index = -1
        self.torn: str | None = None
        self._offset = 0
        self._inode = -1

    def exists(self) -> bool:
        return self.path.exists()

    # -- reading -----------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """Replay the whole file (shared lock)."""
        with self._locked(exclusive=False):
            self._reset()
            self._catch_up()
        return self.doc

    def refresh(self) -> dict[str, Any]:
        """Apply what other processes appended since our last read (shared lock)."""
        with self._locked(exclusive=False):
            self._catch_up()
        return self.doc

    def _reset(self) -> None:
        self.doc, self.index, self._offset, self._inode = {}, -1, 0, -1

    def _catch_up(self) -> None:
        try:
            self._read_from_offset()
        except _Replaced:
            self._reset()
            self._read_from_offset()

    def _read_from_offset(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if self._offset and (st.st_ino != self._inode or st.st_size < self._offset):
                    raise _Replaced
                self._inode = st.st_ino
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            if self._offset:
                raise _Replaced from None
            data = b""
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        *lines, tail = data.split(b"\n")
        resumed = self._offset > 0
        for line in lines:
            if line.strip():
                try:
                    entry = json.loads(line)
                    if resumed and (not isinstance(entry, dict)
                                    or entry.get("index") != self.index + 1):
                        raise _Replaced
                    self._apply(entry)
                except _Replaced:
                    raise
                except PATCH_ERRORS as exc:
                    if resumed:
                        raise _Replaced from None
                    raise StateError(
                        f"{self.path}: the entry after index {self.index} is corrupt ({exc}); "
                        "run `fleetctl state repair` (keeps the damaged file aside) or "
                        "restore a backup") from None
                resumed = False
            self._offset += len(line) + 1
        torn = (f"{self.path}: ignored a torn last line ({len(tail)} bytes, an "
                "interrupted write); it is cut off at the next append") if tail else None
        if torn is not None and torn != self.torn:  # once, not on every refresh
            log.warning("%s", torn)
        self.torn = torn

    def _apply(self, entry: Any) -> None:
        """Check the entry whole, apply it, check the records it touched (shape.py)."""
        check_entry(entry)
        index = entry["index"]
        if index != self.index + 1:
            raise ValueError(f"index {index} follows {self.index}")
        doc = {} if index == 0 else self.doc
        self.doc = apply_patch(doc, entry["patch"])
        check_touched(self.doc, entry["patch"])
        self.index = index

    # -- writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self.lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Exclusive section: catch up with other writers, then append under the lock."""
        with self._locked():
            self._catch_up()
            # A 0-byte log reads as a fresh one (index -1) and gets its index 0 here. That
            # loses nothing: the first append ever writes this index-0 line and fsyncs it
            # before any other entry, and a fsync makes the file's size durable with its
            # data, so a 0-byte file is only what a crash between creating the file and
            # that first fsync leaves: nothing was ever committed to it.
            if self.index < 0:
                self._write([(0, "init", initial_document_patch())])
            txn = Transaction(self.doc)
            yield txn
            if txn.entries:
                self._write([(self.index + 1 + i, e, p) for i, (e, p) in enumerate(txn.entries)])

    def append(self, event: str, patch: Patch) -> None:
        self.append_many([(event, patch)])

    def append_many(self, entries: list[tuple[str, Patch]]) -> None:
        """Append several events with one write and one fsync (group commit)."""
        entries = [(e, p) for e, p in entries if p]
        if not entries:
            return
        with self.transaction() as txn:
            for e, p in entries:
                txn.add(e, p)

    def _write(self, entries: list[tuple[int, str, Patch]]) -> None:
        now = time.time()
        lines = [json.dumps({"index": index, "meta": {"time": now, "event": event},
                             "patch": patch}, separators=(",", ":"))
                 for index, event, patch in entries]
        data = ("\n".join(lines) + "\n").encode()
        # Apply first (in place, cheap), so a bad patch never reaches the file; on any
        # failure forget the in-memory document: the next read replays the file.
        try:
            for index, _event, patch in entries:
                self._apply({"index": index, "patch": patch})
        except PATCH_ERRORS as exc:
            self._reset()
            raise StateError(f"refusing to append an invalid patch to {self.path}: {exc}"
                             ) from None
        try:
            with open(self.path, "ab") as fh:
                if self.torn is not None:  # cut the torn tail so we stay line-aligned
                    fh.truncate(self._offset)
                    self.torn = None
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                self._inode = os.fstat(fh.fileno()).st_ino
            if self._offset == 0:  # the file is new (or was empty): make its name durable
                fsync_dir(self.dir)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a partial write (full disk): cut it off
                if self.path.exists() and self.path.stat().st_size > self._offset:
                    os.truncate(self.path, self._offset)
            self._reset()
            raise StateError(f"cannot append to {self.path}: {exc.strerror}") from None
        self._offset += len(data)

    def repair(self) -> RepairReport:
        """Replay every readable entry, skipping lines that are not JSON or whose patch no
        longer applies; keep the damaged file aside (`state.jsonl.damaged-TIME`) and
        replace the log by one snapshot of the replayed document (atomic). A log whose
        every entry is readable is left as it is (its history too)."""
        with self._locked():
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                raise StateError(f"no event log at {self.path}") from None
            except OSError as exc:
                raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
            doc, kept, skipped = self._salvage(raw)
            if doc is None:
                raise StateError(f"{self.path}: no readable entry to rebuild from; restore "
                                 "it from a backup")
            if not skipped and self._replays():
                return RepairReport(kept, [], None)
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            for n in itertools.count(2):  # never replace an earlier damaged copy
                if not aside.exists():
                    break
                aside = aside.with_name(f"{self.path.name}.damaged-{int(time.time())}-{n}")
            self._write_snapshot(doc, {"event": "repair", "kept": kept,
                                       "skipped": len(skipped)}, keep_aside=aside)
            self._reset()
            self._catch_up()
            return RepairReport(kept, skipped, aside)

    @staticmethod
    def _salvage(raw: bytes) -> tuple[dict[str, Any] | None, int, list[str]]:
        """Replay every entry that is readable and leaves the document whole, in file
        order (index 0 starts over; a log whose index 0 is lost starts from an empty
        document). Returns (document or None if nothing was kept, kept, skipped)."""
        doc: Any = None
        kept: list[Patch] = []  # since the last index 0: to rebuild after a failed entry
        count, skipped = 0, []
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                check_entry(entry)
                patch, prev = entry["patch"], doc
                base = {} if entry["index"] == 0 else initial_document() if doc is None \
                    else doc
                try:
                    doc = apply_patch(base, patch)
                    check_touched(doc, patch)
                except PATCH_ERRORS:  # undo what the entry half-applied
                    doc = prev if entry["index"] == 0 or not kept else _replay(kept)
                    raise
                if entry["index"] == 0:
                    kept = [patch]
                elif not kept:
                    kept = [initial_document_patch(), patch]
                else:
                    kept.append(patch)
                count += 1
            except PATCH_ERRORS as exc:
                skipped.append(f"line {number}: {exc}"[:200])
        return doc, count, skipped

    def _replays(self) -> bool:
        """Whether the log as it is on disk loads whole (every index in order, no torn
        last line): what `repair` leaves alone."""
        self._reset()
        try:
            self._catch_up()
        except StateError:
            return False
        return self.torn is None

    def _write_snapshot(self, doc: dict[str, Any], meta: dict[str, Any],
                        keep_aside: Path | None = None) -> None:
        """Replace the log by one index-0 snapshot of `doc`, atomically (write, fsync,
        rename, fsync the directory); the old file kept as `keep_aside` if given."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        entry = {"index": 0, "meta": {"time": time.time(), **meta},
                 "patch": [{"op": "replace", "path": "", "value": doc}]}
        try:
            with open(tmp, "wb") as fh:
                fh.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            if keep_aside is not None:
                os.link(self.path, keep_aside)
            os.replace(tmp, self.path)
            fsync_dir(self.dir)
        except OSError as exc:
            raise StateError(f"cannot rewrite {self.path}: {exc.strerror}") from None

    def compact(self) -> tuple[int, int]:
        """Replace the log by one index-0 snapshot, atomically (write, fsync, rename).
        Returns (entries before, bytes saved)."""
        with self._locked():
            self._reset()
            self._catch_up()
            if self.index < 0:
                return 0, 0
            before, size = self.index + 1, self._offset
            self._write_snapshot(self.doc, {"event": "snapshot", "entries": before})
            self._reset()
            self._catch_up()
            return before, size - self._offset
