"""msgpack envelope codec: `{v: version, type: name, body: model}` (`body_dict`).

Decoding never raises anything but a ProtocolError subclass, whatever the bytes.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from protocol.errors import InvalidBody, PayloadTooLarge, UnknownType, UnknownVersion
from protocol.models import ALL_TYPES, Model

SCHEMA_VERSION = 1
DEFAULT_MAX_PAYLOAD = 256 * 1024
REGISTRY: dict[str, type[Model]] = {cls.TYPE: cls for cls in ALL_TYPES}
M = TypeVar("M", bound=Model)


def body_dict(model: Model) -> dict[str, Any]:
    """A message's body on the wire: only the fields that differ from their defaults, so
    a receiver older than the sender takes a message that does not use a field it does
    not know (and refuses one that does). A default is therefore part of the protocol:
    changing one changes what older messages mean."""
    return model.model_dump(mode="python", exclude_defaults=True)


def encode(model: Model, *, max_size: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    if model.TYPE not in REGISTRY:
        raise UnknownType(f"cannot encode unregistered type {type(model).__name__}")
    data: bytes = msgpack.packb(
        {"v": SCHEMA_VERSION, "type": model.TYPE, "body": body_dict(model)}, use_bin_type=True
    )
    if len(data) > max_size:
        raise PayloadTooLarge(f"{model.TYPE} payload is {len(data)} bytes (max {max_size})")
    return data


def envelope(data: bytes, *, max_size: int = DEFAULT_MAX_PAYLOAD) -> tuple[str, dict[str, Any]]:
    """The type name and the body of one envelope, as they arrived (not validated)."""
    if len(data) > max_size:
        raise PayloadTooLarge(f"payload is {len(data)} bytes (max {max_size})")
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise InvalidBody(f"not a msgpack envelope: {type(exc).__name__}") from None
    if not isinstance(env, dict) or set(env) != {"v", "type", "body"}:
        raise InvalidBody("envelope must be a map with exactly v, type and body")
    if env["v"] != SCHEMA_VERSION or type(env["v"]) is not int:
        raise UnknownVersion(f"unsupported schema version {env['v']!r} (want {SCHEMA_VERSION})")
    type_name = env["type"]
    if not isinstance(type_name, str) or type_name not in REGISTRY:
        raise UnknownType(f"unexpected message type {type_name!r}")
    if not isinstance(env["body"], dict):
        raise InvalidBody(f"{type_name} body must be a map")
    return type_name, env["body"]


def decode(
    data: bytes,
    *,
    expect: tuple[type[M], ...] | None = None,
    max_size: int = DEFAULT_MAX_PAYLOAD,
) -> M:
    """Decode one envelope; `expect` limits which model types are acceptable."""
    type_name, body = envelope(data, max_size=max_size)
    cls = REGISTRY[type_name]  # `envelope` refused a type not registered
    if expect is not None and cls not in expect:
        raise UnknownType(f"unexpected message type {type_name!r}")
    try:
        model = cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidBody(f"invalid {type_name}: {_clip(where)}: {_clip(first['msg'])}"
                          ) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidBody(f"invalid {type_name}: {_clip(str(exc))}") from None
    return model  # type: ignore[return-value]


def _clip(text: str, limit: int = 120) -> str:
    """Sender-chosen text (e.g. an unknown key) quoted so a message stays one log line."""
    return text if text.isprintable() and len(text) <= limit else repr(text[:limit])
