"""Durable files: an fsync makes a file's data durable, not its name. A file just
created (or renamed into place) lives in its directory, whose entry is only on disk once
the directory itself is fsynced; before that a crash can lose the whole file, every
record it fsynced included (POSIX; ext4 and XFS do lose it)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (a file created or renamed there) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
