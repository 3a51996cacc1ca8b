"""The controller's state as an append-only JSON-Patch event log (NixOps4 state_file).

Each line of `STATE_DIR/state.jsonl` is `{index, meta: {time, event}, patch: [RFC 6902]}`;
index 0 initialises the document with `_type`. Replaying the patches gives the current
document. Appends are fsynced; a torn last line (crash mid-write) is ignored, reported
and cut off before the next append. Writers are serialised across processes with
`flock` on `state.lock`, and each writer first catches up on lines others appended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch

from protocol.errors import StateError

log = logging.getLogger(__name__)
DOC_TYPE = "flotilla-controller-state"
Patch = list[dict[str, Any]]


def initial_document() -> dict[str, Any]:
    return {"_type": DOC_TYPE, "version": 1, "hosts": {}, "rollouts": {}}


def escape(key: str) -> str:
    """JSON-Pointer escaping of one path segment."""
    return key.replace("~", "~0").replace("/", "~1")


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

    # -- reading -----------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """Replay the whole file (shared lock)."""
        with self._locked(exclusive=False):
            self.doc, self.index, self._offset = {}, -1, 0
            self._catch_up()
        return self.doc

    def _catch_up(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                if inode != self._inode:  # compacted (replaced) by another process
                    self._inode, self._offset, self.index, self.doc = inode, 0, -1, {}
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        *lines, tail = data.split(b"\n")
        for n, line in enumerate(lines):
            self._offset += len(line) + 1
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._apply(entry)
            except (ValueError, KeyError, TypeError, jsonpatch.JsonPatchException,
                    jsonpatch.JsonPointerException) as exc:
                raise StateError(
                    f"{self.path}: entry after index {self.index} is corrupt ({exc}); "
                    "restore from backup or remove the bad line"
                ) from None
            del n
        self.torn = None
        if tail:
            self.torn = f"{self.path}: ignored a torn last line ({len(tail)} bytes)"
            log.warning("%s", self.torn)

    def _apply(self, entry: dict[str, Any]) -> None:
        index = entry["index"]
        if index != self.index + 1:
            raise ValueError(f"index {index} follows {self.index}")
        if index == 0:
            self.doc = {}
        self.doc = jsonpatch.JsonPatch(entry["patch"]).apply(self.doc, in_place=True)
        if index == 0 and self.doc.get("_type") != DOC_TYPE:
            raise ValueError("index 0 must set _type")
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
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Exclusive section: catch up with other writers, then append under the lock."""
        with self._locked():
            self._catch_up()
            if self.index < 0:
                self._write([(0, "init", [{"op": "replace", "path": "",
                                           "value": initial_document()}])])
            yield self.doc

    def append(self, event: str, patch: Patch) -> None:
        self.append_many([(event, patch)])

    def append_many(self, entries: list[tuple[str, Patch]]) -> None:
        """Append several events with one write and one fsync (group commit)."""
        entries = [(e, p) for e, p in entries if p]
        if not entries:
            return
        with self.transaction():
            self._write([(self.index + 1 + i, e, p) for i, (e, p) in enumerate(entries)])

    def _write(self, entries: list[tuple[int, str, Patch]]) -> None:
        now = time.time()
        lines = []
        for index, event, patch in entries:
            lines.append(json.dumps({"index": index, "meta": {"time": now, "event": event},
                                     "patch": patch}, separators=(",", ":")))
        data = ("\n".join(lines) + "\n").encode()
        try:
            with open(self.path, "ab") as fh:
                if self.torn is not None:  # cut the torn tail so we stay line-aligned
                    fh.truncate(self._offset)
                    self.torn = None
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StateError(f"cannot append to {self.path}: {exc.strerror}") from None
        for index, _event, patch in entries:
            self._apply({"index": index, "patch": patch})
        self._offset += len(data)

    def compact(self) -> int:
        """Replace the log by one index-0 snapshot, atomically (write, fsync, rename)."""
        with self._locked():
            self._offset, self.index, self.doc = 0, -1, {}
            self._catch_up()
            before = self.index + 1
            tmp = self.path.with_suffix(".jsonl.tmp")
            entry = {"index": 0, "meta": {"time": time.time(), "event": "snapshot"},
                     "patch": [{"op": "replace", "path": "", "value": self.doc}]}
            try:
                with open(tmp, "wb") as fh:
                    fh.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise StateError(f"cannot compact {self.path}: {exc.strerror}") from None
            self._offset, self.index, self.doc = 0, -1, {}
            self._catch_up()
            return before
