"""The controller's ed25519 signing key pair in the state dir."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import InputError, StateError
from protocol.signing import generate_key, load_private_key, private_key_pem, public_key_pem

KEY_NAME, PUB_NAME = "controller.key", "controller.pub"


def init_keys(state_dir: Path, force: bool = False) -> tuple[Path, Path]:
    key_path, pub_path = state_dir / KEY_NAME, state_dir / PUB_NAME
    if key_path.exists() and not force:
        raise InputError(f"{key_path} exists already (use --force to replace it; agents"
                         " trusting the old key will reject new deploys)")
    key = generate_key()
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = key_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_key_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, key_path)
        pub_path.write_bytes(public_key_pem(key.public_key()))
    except OSError as exc:
        raise StateError(f"cannot write keys to {state_dir}: {exc.strerror}") from None
    return key_path, pub_path


def load_key(state_dir: Path) -> Ed25519PrivateKey:
    return load_private_key(state_dir / KEY_NAME)
