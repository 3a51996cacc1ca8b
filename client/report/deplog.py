"""The output of one deployment: every line its programs print, kept and sent.

Each line goes to `STATE_DIR/logs/DEPLOYMENT.log` (JSON lines; bounded: past
`max_bytes` the file is rotated to `.1`, so at most twice that is kept per deployment,
and only the last `keep` deployments' logs are kept) and into a buffer that a flusher
sends as `Log` events: at most one event per `interval`, at most MAX_LOG_BATCH lines
each. Lines beyond `max_buffer` between two sends are left out of the events (the
file keeps them) and counted in the next event's `dropped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from client.host.backend import LineFn
from protocol.models import MAX_LOG_BATCH, MAX_LOG_LINE, LogLine
from protocol.rotlog import RotatingFile, read_lines

log = logging.getLogger(__name__)
SendFn = Callable[[list[LogLine], int], Awaitable[None]]
MAX_BYTES = 1 << 20
KEEP = 10
INTERVAL = 0.5
MAX_BUFFER = 2000


def log_dir(state_dir: Path) -> Path:
    return state_dir / "logs"


def log_path(state_dir: Path, deployment_id: str) -> Path:
    return log_dir(state_dir) / f"{deployment_id}.log"


def read_log(state_dir: Path, deployment_id: str) -> list[LogLine]:
    """The lines kept for a deployment (rotated part first); unreadable lines skipped."""
    out: list[LogLine] = []
    for raw in read_lines(log_path(state_dir, deployment_id)):
        with contextlib.suppress(ValueError):
            out.append(LogLine.model_validate_json(raw))
    return out


class DeploymentLog:
    def __init__(self, state_dir: Path, deployment_id: str, send: SendFn, *,
                 max_bytes: int = MAX_BYTES, keep: int = KEEP, interval: float = INTERVAL,
                 max_buffer: int = MAX_BUFFER) -> None:
        self.path = log_path(state_dir, deployment_id)
        self._send = send
        self.max_bytes, self.interval, self.max_buffer = max_bytes, interval, max_buffer
        self._buffer: list[LogLine] = []
        self._dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._file: RotatingFile | None = RotatingFile(self.path, max_bytes, mode=0o640)
        self.tail: list[str] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._prune(keep)
        except OSError as exc:  # the deploy goes on; its lines are still sent
            log.warning("cannot keep the deployment log %s: %s", self.path, exc)
            self._file = None

    def _prune(self, keep: int) -> None:
        with os.scandir(self.path.parent) as it:
            logs = [e for e in it if e.name.endswith(".log") and e.name != self.path.name]
        if len(logs) < keep:
            return
        logs.sort(key=lambda e: e.stat().st_mtime)
        for old in logs[:len(logs) - keep + 1]:
            for p in (Path(old.path), Path(old.path + ".1")):
                p.unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------------
    def writer(self, source: str) -> LineFn:
        """A line callback for programs of `source` (e.g. `migrate:db`)."""
        return lambda stream, text: self.line(stream, source, text)

    def line(self, stream: str, source: str, text: str) -> None:
        text = text.rstrip("\r\n")[:MAX_LOG_LINE]
        entry = LogLine(time=time.time(), stream=stream, source=source[:128],  # type: ignore[arg-type]
                        text=text)
        self._write(entry)
        self.tail = [*self.tail[-19:], f"{source}: {text}" if source else text]
        if len(self._buffer) >= self.max_buffer:
            self._buffer.pop(0)
            self._dropped += 1
        self._buffer.append(entry)
        self._wake.set()

    def _write(self, entry: LogLine) -> None:
        if self._file is None:
            return
        try:
            self._file.append((entry.model_dump_json() + "\n").encode())
        except OSError as exc:
            log.warning("deployment log %s: %s; no longer written", self.path, exc)
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- sending -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flusher(),
                                                               name=f"log-{self.path.stem}")

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(self.interval)

    async def flush(self) -> None:
        while self._buffer or self._dropped:
            batch, self._buffer = self._buffer[:MAX_LOG_BATCH], self._buffer[MAX_LOG_BATCH:]
            dropped, self._dropped = self._dropped, 0
            try:
                await self._send(batch, dropped)
            except Exception as exc:  # sending is best effort: the file has the lines
                log.warning("could not send %d log line(s): %s", len(batch), exc)
                return
            if len(self._buffer) < MAX_LOG_BATCH:
                break
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Send what is left and stop (at the end of the deployment)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._buffer or self._dropped:
            before = len(self._buffer)
            await self.flush()
            if len(self._buffer) >= before:
                break
        self._close_file()

