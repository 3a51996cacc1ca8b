"""ed25519 signatures over the canonical msgpack encoding of a message body.

The signed bytes are a domain tag, the message type, and the body (without
`signature`) packed with sorted keys, so a signature on one type can never be
replayed as another and field order never matters.

The body signed is the body sent (`codec.body_dict`: fields at their defaults left out).
A receiver checks the signature over the body as it arrived (`verify_payload`), never
over a re-encoding of the model it parsed: a body from an older controller lacks the
fields added since, which the parsed model fills in, so a re-encoding could differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.codec import body_dict, encode, envelope
from protocol.errors import BadSignature, InputError
from protocol.models import Model

DOMAIN = b"flotilla-sig-v1\x00"
S = TypeVar("S", bound=Model)


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def signed_data(type_name: str, body: dict[str, Any]) -> bytes:
    """What is signed for a message of `type_name` whose body is `body`."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    packed: bytes = msgpack.packb(_canonical(unsigned), use_bin_type=True)
    return DOMAIN + type_name.encode() + b"\x00" + packed


def signed_bytes(model: Model) -> bytes:
    return signed_data(model.TYPE, body_dict(model))  # the body as it goes on the wire


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(model: S, key: Ed25519PrivateKey) -> S:
    """Return a copy of `model` carrying key id and signature."""
    unsigned = model.model_copy(update={"key_id": key_id(key.public_key()), "signature": b""})
    return unsigned.model_copy(update={"signature": key.sign(signed_bytes(unsigned))})


def verify(model: Model, trusted: list[Ed25519PublicKey]) -> None:
    """Raise BadSignature unless one trusted key signed exactly this model's body."""
    verify_payload(encode(model), trusted)


def verify_payload(payload: bytes, trusted: list[Ed25519PublicKey]) -> None:
    """Raise BadSignature unless one trusted key signed the body of this envelope exactly
    as it arrived (a ProtocolError if it is no envelope)."""
    type_name, body = envelope(payload)
    sig = body.get("signature", b"")
    if not sig:
        raise BadSignature(f"{type_name} is not signed")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise BadSignature(f"{type_name} signature is malformed")
    data = signed_data(type_name, body)
    for pub in trusted:
        try:
            pub.verify(sig, data)
            return
        except InvalidSignature:
            continue
    raise BadSignature(f"{type_name} signature does not verify against any trusted key")


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise InputError(f"signing key {path} not found: run 'fleetctl keys init'") from None
    except (ValueError, TypeError, OSError) as exc:
        raise InputError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} is not an ed25519 private key")
    return key


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Load one or more PEM public keys (concatenated) from a trust file."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read trusted key file {path}: {exc.strerror}") from None
    keys: list[Ed25519PublicKey] = []
    marker = b"-----END PUBLIC KEY-----"
    for chunk in text.split(marker):
        if b"-----BEGIN PUBLIC KEY-----" not in chunk:
            continue
        try:
            key = serialization.load_pem_public_key(chunk + marker)
        except ValueError as exc:
            raise InputError(f"bad public key in {path}: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InputError(f"{path} holds a key that is not ed25519")
        keys.append(key)
    if not keys:
        raise InputError(f"no ed25519 public key in {path}")
    return keys
