"""Dumps: compressed, optionally age-encrypted, atomic, pruned, restored byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pyrage
import pytest

from client.backend import BackendError
from client.dumps import DumpStore


def make_tree(root: Path) -> dict[str, bytes]:
    (root / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(5000), "sub/b.txt": b"hello\n" * 300}
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.symlink("a.bin", root / "link")
    return files


def assert_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert os.readlink(root / "link") == "a.bin"


def test_paths_round_trip_and_remove_what_was_absent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = make_tree(data)
    absent = tmp_path / "absent-at-dump-time"
    store = DumpStore(tmp_path / "state")
    slot = store.slot("db", "16", 3)
    archive = store.seal_paths(slot, [str(data), str(absent)])
    assert archive.name == "dump.tar.zst" and archive.parent == tmp_path / "state/dumps/db/16-3"
    assert archive.stat().st_size < 5000 + 1800 + 2048  # compressed text, raw random
    # the migration wrecks things, and creates a path that did not exist
    (data / "a.bin").write_bytes(b"corrupt")
    (data / "sub" / "b.txt").unlink()
    (data / "new").write_text("x")
    absent.write_text("created by the migration")
    store.restore_paths(archive, [str(data), str(absent)])
    assert_tree(data, files)
    assert not (data / "new").exists()
    assert not absent.exists()


def test_age_encrypted_dumps_need_the_identity(tmp_path: Path) -> None:
    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "age.key"
    key_file.write_text(str(identity))
    data = tmp_path / "data"
    files = make_tree(data)
    store = DumpStore(tmp_path / "state", age_recipient=str(identity.to_public()))
    archive = store.seal_paths(store.slot("db", "1", 1), [str(data)])
    assert archive.name == "dump.tar.zst.age"
    assert b"hello" not in archive.read_bytes()
    (data / "a.bin").write_bytes(b"changed")
    with pytest.raises(BackendError, match="--age-identity"):
        store.restore_paths(archive, [str(data)])
    DumpStore(tmp_path / "state", age_identity=str(key_file)).restore_paths(archive, [str(data)])
    assert_tree(data, files)


def test_retention_keeps_the_newest_dumps(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    store = DumpStore(tmp_path / "state", retention=2)
    for gen in range(1, 5):
        slot = store.slot("db", "1", gen)
        store.seal_paths(slot, [str(src)])
        os.utime(slot, (gen, gen))  # distinct ages
    kept = sorted(p.name for p in (tmp_path / "state/dumps/db").iterdir())
    assert kept == ["1-3", "1-4"]


def test_corrupt_dump_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    store = DumpStore(tmp_path / "state")
    archive = store.seal_paths(store.slot("db", "1", 1), [str(src)])
    archive.write_bytes(archive.read_bytes()[:10])
    with pytest.raises(BackendError, match="corrupt"):
        store.restore_paths(archive, [str(src)])
