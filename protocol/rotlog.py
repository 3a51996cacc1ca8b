"""Bounded line files: appended to, rotated once to `NAME.1`, read and followed whole.

Both sides keep deployment output this way (the agent per deployment in
`client.report.deplog`, the controller per rollout and host in `controller.state.logs`): a file
past `max_bytes` is renamed to `NAME.1` (replacing the previous one) and started
afresh, so at most about twice `max_bytes` is kept. Each `append` is one write(2) of
whole lines on an O_APPEND descriptor, so a reader never sees half a record except
while it is being written (`Follower` keeps an unfinished last line for later).
"""

from __future__ import annotations

import os
from pathlib import Path


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class RotatingFile:
    """Appends whole lines to `path`, rotating past `max_bytes`. `keep_open` holds the
    descriptor between appends (one file written often); otherwise each append opens
    and closes it (a controller writes one file per host: thousands). The size is
    counted here, not asked of the disk each time: one writer per file."""

    def __init__(self, path: Path, max_bytes: int, *, mode: int = 0o644,
                 keep_open: bool = True) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.mode = mode
        self.keep_open = keep_open
        self._fd: int | None = None
        self._size: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
            if self._size is None:
                self._size = os.fstat(self._fd).st_size
        return self._fd

    def append(self, data: bytes) -> None:
        """Write `data` (whole lines); OSError passes through, and the next append asks
        the disk for the size again."""
        try:
            fd = self._open()
            size = self._size or 0
            if size and size + len(data) > self.max_bytes:
                self.close()
                os.replace(self.path, rotated(self.path))
                self._size = 0
                fd = self._open()
                size = 0
            os.write(fd, data)
            self._size = size + len(data)
        except OSError:
            self.close()
            self._size = None
            raise
        finally:
            if not self.keep_open:
                self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def read_lines(path: Path) -> list[str]:
    """Every line kept (the rotated part first); missing files are empty."""
    out: list[str] = []
    for part in (rotated(path), path):
        try:
            out.extend(part.read_text(errors="replace").splitlines())
        except OSError:
            continue
    return out


class Follower:
    """The lines appended to a rotating file since the last `read()` (tail -F): each
    line once, in order, across a rotation between two reads (the part renamed to `.1`
    is finished first). The first read returns everything kept."""

    _FINISHED = -1  # the file we read was rotated and finished: the next one from 0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: int | None = None  # of the file read so far; None: nothing read yet
        self._offset = 0
        self._partial = b""

    def read(self) -> list[str]:
        try:
            current = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except OSError:
            current = None
        chunks: list[bytes] = []
        try:
            inode = os.fstat(current.fileno()).st_ino if current is not None else None
            if self._inode is None:
                if current is None:
                    return []  # nothing yet (or mid-rotation): all of it next time
                chunks.append(_read_from(rotated(self.path), 0, None))
            elif inode != self._inode and self._inode != self._FINISHED:
                chunks.append(_read_from(rotated(self.path), self._offset, self._inode))
                self._inode, self._offset = self._FINISHED, 0
            if current is not None:
                current.seek(self._offset if inode == self._inode else 0)
                chunks.append(current.read())
                self._inode, self._offset = inode, current.tell()
        finally:
            if current is not None:
                current.close()
        data = self._partial + b"".join(chunks)
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [line.decode(errors="replace") for line in lines]


def _read_from(path: Path, offset: int, inode: int | None) -> bytes:
    """`path` from `offset` on (nothing if missing, or if it is not file `inode`)."""
    try:
        with open(path, "rb") as fh:
            if inode is not None and os.fstat(fh.fileno()).st_ino != inode:
                return b""
            fh.seek(offset)
            return fh.read()
    except OSError:
        return b""
