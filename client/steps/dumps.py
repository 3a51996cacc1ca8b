"""Rollback points for state: `dumps/<step>/<revision>-<generation>/dump.tar.zst[.age]`.

A dump is either what the step's dump program wrote into FLOTILLA_DUMP_DIR, or an
archive of the step's declared paths. Archives are zstandard-compressed tarballs,
optionally encrypted to an age recipient (pyrage), written atomically (tmp, fsync,
rename) so a half-written dump is never trusted. Only `retention` dumps per step stay.

A step with a `user` runs its dump and restore programs as that user, who cannot enter
the agent's state dir (0700 root, as the NixOS module makes it). Its FLOTILLA_DUMP_DIR
is a fresh directory of its own under `scratch_base` (default /var/tmp, mode 1777):
made 0700 by root, filled (restore) while still root's, and only then given to the
user, so nothing the user does can make root write elsewhere; the agent archives it
into the state dir and removes it.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import zstandard

from client.host.backend import BackendError
from protocol.errors import UsageError

ARCHIVE = "dump.tar.zst"
SCRATCH_BASE = Path("/var/tmp")
Owner = tuple[int, int]  # (uid, gid) of a step's user, when its programs run as someone else


class DumpStore:
    def __init__(self, state_dir: Path, retention: int = 3, age_recipient: str | None = None,
                 age_identity: str | None = None, scratch_base: Path = SCRATCH_BASE) -> None:
        self.root = state_dir / "dumps"
        self.scratch_base = scratch_base
        self.retention = max(1, retention)
        self.age_recipient = age_recipient
        self.age_identity = age_identity

    def slot(self, step: str, revision: str, generation: int) -> Path:
        return self.root / step / f"{revision}-{generation}"

    def archive_path(self, slot: Path) -> Path:
        return slot / (ARCHIVE + (".age" if self.age_recipient else ""))

    def scratch(self, slot: Path, owner: Owner | None = None) -> Path:
        """Empty directory a dump program writes into (FLOTILLA_DUMP_DIR)."""
        if owner is not None:
            d = self._private_dir(f"flotilla-dump-{slot.parent.name}-")
            _give(d, owner)
            return d
        d = slot / "scratch"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def staging(self, archive: Path, owner: Owner | None = None) -> Path:
        """The dump unpacked for a restore program (FLOTILLA_DUMP_DIR): in the slot, or
        for a step's user a directory of its own, handed over only once filled."""
        if owner is None:
            d = archive.parent / "restore"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            self.unpack(archive, d)
            return d
        d = self._private_dir(f"flotilla-restore-{archive.parent.parent.name}-")
        try:
            self.unpack(archive, d)
            os.chmod(d, 0o700)  # the archived "." may have been looser
            for sub, dirs, files in os.walk(d):
                for name in dirs + files:
                    os.lchown(os.path.join(sub, name), *owner)
            _give(d, owner)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d

    def _private_dir(self, prefix: str) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch_base))
        except OSError as exc:
            raise BackendError(f"cannot make a scratch directory in {self.scratch_base}: "
                               f"{exc.strerror}") from None

    @staticmethod
    def discard(scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)

    def seal_dir(self, slot: Path, source: Path) -> Path:
        """Archive a dump program's output directory (then remove it)."""
        try:
            return self._write(slot, lambda tar: tar.add(source, arcname="."))
        finally:
            self.discard(source)

    def seal_paths(self, slot: Path, paths: list[str]) -> Path:
        """Archive declared paths (absent ones are recorded as absent)."""
        def add(tar: tarfile.TarFile) -> None:
            for p in paths:
                if os.path.lexists(p):
                    tar.add(p, arcname=_arcname(p))
        archive = self._write(slot, add)
        (slot / "paths").write_text("\n".join(paths) + "\n")
        return archive

    def _write(self, slot: Path, fill: object) -> Path:
        slot.mkdir(parents=True, exist_ok=True)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            fill(tar)  # type: ignore[operator]
        data = zstandard.ZstdCompressor(level=6).compress(raw.getvalue())
        if self.age_recipient:
            data = _age_encrypt(data, self.age_recipient)
        target = self.archive_path(slot)
        tmp = target.with_suffix(target.suffix + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise BackendError(f"cannot write dump {target}: {exc.strerror}") from None
        shutil.rmtree(slot / "scratch", ignore_errors=True)
        self._prune(slot.parent, keep=slot)
        return target

    def _prune(self, step_dir: Path, keep: Path) -> None:
        slots = sorted((p for p in step_dir.iterdir() if p.is_dir()),
                       key=lambda p: p.stat().st_mtime)
        for old in slots[: max(0, len(slots) - self.retention)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def unpack(self, archive: Path, into: Path, identity: str | None = None) -> None:
        try:
            data = archive.read_bytes()
        except OSError as exc:
            raise BackendError(f"dump {archive} is unreadable: {exc.strerror}") from None
        if archive.suffix == ".age":
            data = _age_decrypt(data, identity or self.age_identity)
        try:
            raw = zstandard.ZstdDecompressor().decompress(data)
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r") as tar:
                tar.extractall(into, filter="tar")
        except (zstandard.ZstdError, tarfile.TarError, OSError) as exc:
            raise BackendError(f"dump {archive} is corrupt: {exc}") from None

    def restore_paths(self, archive: Path, paths: list[str], identity: str | None = None) -> None:
        """Put declared paths back exactly as dumped (absent ones are removed)."""
        staging = archive.parent / "restore"
        shutil.rmtree(staging, ignore_errors=True)
        self.unpack(archive, staging, identity)
        for p in paths:
            src = staging / _arcname(p)
            _remove(Path(p))
            if os.path.lexists(src):
                Path(p).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), p)
        shutil.rmtree(staging, ignore_errors=True)


def _give(d: Path, owner: Owner) -> None:
    try:
        os.chown(d, *owner)
    except OSError as exc:
        shutil.rmtree(d, ignore_errors=True)
        raise BackendError(f"cannot give {d} to uid {owner[0]}: {exc.strerror}") from None


def _arcname(path: str) -> str:
    return path.lstrip("/") or "root"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif os.path.lexists(p):
        p.unlink()


def _age_encrypt(data: bytes, recipient: str) -> bytes:
    try:
        import pyrage
    except ImportError:
        raise BackendError("age encryption needs the 'pyrage' package (pip install "
                           "flotilla[age])") from None
    try:
        return bytes(pyrage.encrypt(data, [pyrage.x25519.Recipient.from_str(recipient)]))
    except Exception as exc:
        raise BackendError(f"cannot encrypt dump to {recipient}: {exc}") from None


def _age_decrypt(data: bytes, identity: str | None) -> bytes:
    if identity is None:
        raise BackendError("dump is age-encrypted: restoring it needs the agent's "
                           "--age-identity FILE")
    try:
        import pyrage
        return bytes(pyrage.decrypt(data, _identities(identity)))
    except Exception as exc:
        raise BackendError(f"cannot decrypt dump: {exc}") from None


def _identities(path: str) -> list[Any]:
    """The identities in an age identity file as `age-keygen` writes it: `#` comment
    lines (created, public key), then one AGE-SECRET-KEY-1... line per identity."""
    import pyrage
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    keys = [pyrage.x25519.Identity.from_str(ln) for ln in lines if ln and not ln.startswith("#")]
    if not keys:
        raise ValueError("no AGE-SECRET-KEY-1... line")
    return keys


def check_age_keys(recipient: str | None, identity: str | None) -> None:
    """What a dump and a rollback will need, checked when the agent starts rather than
    at the first dump (a recipient that does not parse fails every deploy with a
    dump) or at the first rollback (an identity that cannot be read leaves the data
    where the failed migration left it): the recipient parses, the identity file reads
    and parses, and, both given, the identity decrypts what is encrypted to the
    recipient. UsageError naming the option."""
    if recipient is None and identity is None:
        return
    try:
        import pyrage
    except ImportError:
        raise UsageError("age encryption needs the 'pyrage' package (pip install "
                         "flotilla[age])") from None
    if recipient is not None:
        try:
            pyrage.x25519.Recipient.from_str(recipient)
        except Exception as exc:
            raise UsageError(f"--age-recipient {recipient!r} is no age recipient "
                             f"(age1...): {exc}") from None
    if identity is None:
        return
    try:
        keys = _identities(identity)
    except OSError as exc:
        raise UsageError(f"--age-identity: cannot read {identity}: {exc.strerror}") from None
    except Exception as exc:
        raise UsageError(f"--age-identity {identity}: no age identity in it ({exc})") from None
    if recipient is not None and recipient not in {str(k.to_public()) for k in keys}:
        raise UsageError(f"--age-identity {identity} cannot decrypt what is encrypted to "
                         f"--age-recipient {recipient}: a rollback could not restore the "
                         "dumps")
