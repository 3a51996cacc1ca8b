"""Dumps: compressed, optionally age-encrypted, atomic, pruned, restored byte for byte."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyrage
import pytest

from client.host.backend import BackendError
from client.host.sim import SimulatedBackend
from client.steps.dumps import DumpStore
from client.steps.programs import StepEnv, dump_step, restore_step
from protocol.models import Desired
from protocol.steps import StepDecl
from tests.stepsys import script


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


# -- issue 11 item 5: dumps and restores of a step that runs as its own user ------------------

def module_state_dir_rule() -> tuple[int, str, str]:
    """(mode, owner, group) the NixOS module gives the agent's state dir (tmpfiles rule),
    evaluated with the real nixpkgs lib, with a step that declares `user`."""
    from tests.test_nix_module import TWO_STEPS, eval_module
    kind, _path, mode, owner, group, *_ = eval_module(TWO_STEPS)["tmpfiles"][0].split()
    assert kind == "d"
    return int(mode, 8), owner, group


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory every user can enter (like /nix/store for programs, /var/tmp)."""
    d = Path(tempfile.mkdtemp(prefix="flotilla-test-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_dump_and_restore_run_as_the_steps_user_under_the_modules_modes(
        tmp_path: Path, world: Path) -> None:
    """The README's postgresql case: `dump of postgresql failed: … Permission denied`,
    because the dump dir sat inside the 0700 root state dir. Now the programs run as
    `nobody` (a real second uid) with a FLOTILLA_DUMP_DIR of their own."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as the agent runs (make test runs as root)")
    nobody = pwd.getpwnam("nobody")
    mode, owner, group = module_state_dir_rule()
    assert (mode, owner, group) == (0o700, "root", "root")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    db = world / "db"
    db.mkdir()
    (db / "data").write_text("version 15\n")
    os.chown(db, nobody.pw_uid, nobody.pw_gid)
    os.chown(db / "data", nobody.pw_uid, nobody.pw_gid)
    dump = script(world / "dump", 'id -un > "$FLOTILLA_DUMP_DIR/by"; '
                                  f'cp {db}/data "$FLOTILLA_DUMP_DIR/data"\n')
    restore = script(world / "restore", f'cp "$FLOTILLA_DUMP_DIR/data" {db}/data; '
                                        f'id -un > {db}/restored-by\n')
    scratch = world / "tmp"
    scratch.mkdir()
    scratch.chmod(0o1777)
    step = StepDecl(name="postgresql", user="nobody", dump=dump, restore=restore)
    backend = SimulatedBackend(state, "h1")
    store = DumpStore(state, scratch_base=scratch)
    env = StepEnv("h1", None, Desired(host="h1", deployment_id="d1", generation=2,
                                      system="/s", issued_at=1.0))

    archive = Path(asyncio.run(dump_step(backend, store, step, "16", env)))
    assert archive.parent == state / "dumps/postgresql/16-2"
    assert archive.stat().st_uid == 0
    (db / "data").write_text("version 16, half migrated\n")
    asyncio.run(restore_step(backend, store, step, str(archive), env))
    assert (db / "data").read_text() == "version 15\n"
    assert (db / "restored-by").read_text() == "nobody\n"
    unpacked = tmp_path / "unpacked"
    store.unpack(archive, unpacked)
    assert (unpacked / "by").read_text() == "nobody\n"
    assert list(scratch.iterdir()) == []  # scratch and staging dirs are gone
    assert stat.S_IMODE(state.stat().st_mode) == 0o700  # the state dir was left alone


def test_a_step_user_cannot_redirect_the_restore(tmp_path: Path, world: Path) -> None:
    """The staging dir is filled while only root can enter it, then handed over."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as the agent runs (make test runs as root)")
    nobody = pwd.getpwnam("nobody")
    store = DumpStore(tmp_path / "state", scratch_base=world)
    slot = store.slot("s", "1", 1)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("x")
    archive = store.seal_dir(slot, src)
    staging = store.staging(archive, (nobody.pw_uid, nobody.pw_gid))
    try:
        for p in [staging, staging / "sub", staging / "sub" / "f"]:
            assert (p.stat().st_uid, p.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    finally:
        store.discard(staging)
    assert not src.exists()  # sealed dirs are removed


def keygen_file(path: Path, identity: Any) -> Path:
    """An identity file as `age-keygen -o FILE` writes it."""
    path.write_text(f"# created: 2026-12-03T11:30:00Z\n# public key: {identity.to_public()}\n"
                    f"{identity}\n")
    return path


def test_an_identity_file_written_by_age_keygen_restores_the_dump(tmp_path: Path) -> None:
    """Its two comment lines made the whole file no identity: the rollback failed."""
    identity = pyrage.x25519.Identity.generate()
    key_file = keygen_file(tmp_path / "age.key", identity)
    data = tmp_path / "data"
    files = make_tree(data)
    store = DumpStore(tmp_path / "state", age_recipient=str(identity.to_public()),
                      age_identity=str(key_file))
    archive = store.seal_paths(store.slot("db", "1", 1), [str(data)])
    (data / "a.bin").write_bytes(b"changed")
    store.restore_paths(archive, [str(data)])
    assert_tree(data, files)


def test_age_keys_are_checked_when_the_agent_starts(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Not at the first dump or the first rollback."""
    from client.cli import main
    from client.steps.dumps import check_age_keys
    from controller.state.keys import init_keys
    from protocol.errors import UsageError
    mine, other = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    good = keygen_file(tmp_path / "mine.key", mine)
    bare = tmp_path / "bare.key"
    bare.write_text(f"{mine}\n")
    (tmp_path / "garbage.key").write_text("# just a comment\n")
    check_age_keys(str(mine.to_public()), str(good))
    check_age_keys(str(mine.to_public()), str(bare))
    check_age_keys(None, str(good))  # decrypting older dumps only
    check_age_keys(str(other.to_public()), None)  # identity kept elsewhere
    for recipient, identity, fragment in [
            ("bogus", None, "--age-recipient 'bogus' is no age recipient"),
            (None, str(tmp_path / "missing.key"), "cannot read"),
            (None, str(tmp_path / "garbage.key"), "no age identity"),
            (str(other.to_public()), str(good), "cannot decrypt what is encrypted")]:
        with pytest.raises(UsageError, match=fragment):
            check_age_keys(recipient, identity)
    _, pub = init_keys(tmp_path / "controller")
    code = main(["run", "--host", "web1", "--state-dir", str(tmp_path / "agent"),
                 "--trust-key", str(pub), "--broker", "mqtt://127.0.0.1:9",
                 "--age-recipient", str(other.to_public()), "--age-identity", str(good)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--age-identity" in err[0], err
