"""Deployment logs as the controller keeps them: the one place that reads and writes them.

The lines agents send (in Log events, or riding on Progress and Result) are stored per
rollout, next to the event log and not inside it: `STATE_DIR/logs/ROLLOUT/HOST.jsonl`,
one JSON object per line (`{seq, deployment_id, time, stream, source, text}`; a
`{seq, deployment_id, dropped}` record notes lines the agent left out of its events).
A host's file is bounded: past MAX_BYTES it is rotated to `HOST.jsonl.1` (so at most
twice that is kept).

Readers (`fleetctl logs`, `deploy`'s failure summary, the web dashboard) use
`read_lines` / `tail`; the driver writes through `LogStore.append`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import rotlog
from protocol.errors import InputError
from protocol.models import Event, carried_lines
from protocol.topics import HOST_NAME_RE

LATE_LINES_S = 5.0
"""How long after a host's outcome its last lines may still reach the driver: the
outcome can come from its retained state when the driver (re)connects, ahead of the
events its session queued (a NATS cluster delivers them after). The driver waits this
long for them before it ends; `logs --follow` keeps reading the store as long."""
MAX_BYTES = 4 << 20
ROLLOUT_RE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@-")


@dataclass(frozen=True)
class LogRecord:
    deployment_id: str
    seq: int
    time: float
    stream: str
    source: str
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"deployment_id": self.deployment_id, "seq": self.seq, "time": self.time,
                "stream": self.stream, "source": self.source, "text": self.text}


def rollout_of(deployment_id: str) -> str:
    """Attempt n of rollout R deploys as `R.n` (see controller.state.store.deployment_id)."""
    head, _, tail = deployment_id.rpartition(".")
    return head if head and tail.isdigit() else deployment_id


def _safe(rollout_id: str, host: str) -> None:
    if not rollout_id or not set(rollout_id) <= ROLLOUT_RE_CHARS or rollout_id.startswith("."):
        raise InputError(f"invalid rollout id {rollout_id!r}")
    if not HOST_NAME_RE.fullmatch(host):
        raise InputError(f"invalid host name {host!r}")


def log_file(state_dir: Path, rollout_id: str, host: str) -> Path:
    _safe(rollout_id, host)
    return state_dir / "logs" / rollout_id / f"{host}.jsonl"


class LogStore:
    """Appends Log events to the per-rollout host files (the driver's side)."""

    def __init__(self, state_dir: Path, max_bytes: int = MAX_BYTES) -> None:
        self.state_dir = state_dir
        self.max_bytes = max_bytes
        self._seen: dict[tuple[str, str], int] = {}
        # (rollout, host) -> its file, path checked once; opened per append (one per host)
        self._files: dict[tuple[str, str], rotlog.RotatingFile] = {}
        self._dirs: set[Path] = set()  # rollout directories made

    def append(self, ev: Event) -> bool:
        """Store the lines one event carries (`carried_lines`); False for a duplicate (QoS
        1 redelivery) or an event without lines."""
        lines, dropped = carried_lines(ev)
        if ev.deployment_id is None or not (lines or dropped):
            return False
        key = (ev.host, ev.deployment_id)
        if ev.seq <= self._seen.get(key, -1):
            return False
        self._seen[key] = ev.seq
        where = (rollout_of(ev.deployment_id), ev.host)
        file = self._files.get(where)
        if file is None:
            file = self._files[where] = rotlog.RotatingFile(
                log_file(self.state_dir, *where), self.max_bytes, keep_open=False)
        records = [{"deployment_id": ev.deployment_id, "seq": ev.seq, "time": line.time,
                    "stream": line.stream, "source": line.source, "text": line.text}
                   for line in lines]
        if dropped:
            records.append({"deployment_id": ev.deployment_id, "seq": ev.seq,
                            "time": ev.time, "dropped": dropped})
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        directory = file.path.parent
        try:
            if directory not in self._dirs:
                directory.mkdir(parents=True, exist_ok=True)
                self._dirs.add(directory)
            file.append(data)
        except OSError as exc:
            self._dirs.discard(directory)
            raise InputError(f"cannot write the log {file.path}: {exc.strerror}") from None
        return True


def _parse(raw: str) -> LogRecord | None:
    try:
        r = json.loads(raw)
        if "dropped" in r:
            return LogRecord(str(r["deployment_id"]), int(r["seq"]), float(r["time"]),
                             "agent", "log",
                             f"({int(r['dropped'])} line(s) not sent; the host's own log "
                             "has them)")
        return LogRecord(str(r["deployment_id"]), int(r["seq"]), float(r["time"]),
                         str(r["stream"]), str(r["source"]), str(r["text"]))
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line (the driver was killed mid-write)


def read_lines(state_dir: Path, rollout_id: str, host: str,
               deployment_id: str | None = None) -> list[LogRecord]:
    """Every stored line of `host` in `rollout_id` (one attempt if `deployment_id`)."""
    return parse(rotlog.read_lines(log_file(state_dir, rollout_id, host)), deployment_id)


def parse(raw_lines: list[str], deployment_id: str | None = None) -> list[LogRecord]:
    """The records of stored lines (of one attempt if `deployment_id`)."""
    out = []
    for raw in raw_lines:
        rec = _parse(raw)
        if rec is not None and (deployment_id is None or rec.deployment_id == deployment_id):
            out.append(rec)
    return out


class LineFollower:
    """The records stored for `host` in `rollout_id` since the last `read()`."""

    def __init__(self, state_dir: Path, rollout_id: str, host: str,
                 deployment_id: str | None = None) -> None:
        self._file = rotlog.Follower(log_file(state_dir, rollout_id, host))
        self._deployment_id = deployment_id

    def read(self) -> list[LogRecord]:
        return parse(self._file.read(), self._deployment_id)


def tail(state_dir: Path, rollout_id: str, host: str, n: int = 10,
         deployment_id: str | None = None) -> list[LogRecord]:
    return read_lines(state_dir, rollout_id, host, deployment_id)[-n:]


def format_line(rec: LogRecord, with_time: bool = True) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(rec.time)) + " " if with_time else ""
    where = f"[{rec.source}] " if rec.source else ""
    err = "! " if rec.stream == "stderr" else ""
    return f"{stamp}{where}{err}{rec.text}"
