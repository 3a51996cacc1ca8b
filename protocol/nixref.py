"""Nix vocabulary shared by controller and agent (pure): flags, installables, outputs,
binary-cache keys and the commands that check signatures.

Both sides build `REF#nixosConfigurations.NAME.config.system.build.toplevel` (the
controller for every host, an agent for itself with `--build-on host`) and both must
read what `nix build --json` prints: Nix 2.8 has no `--print-out-paths`, current Nix has
both, so `--json` is the one that works everywhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence

from protocol.errors import InputError
from protocol.models import NIX_PUBLIC_KEY_RE, BinaryCache

NIX_FLAGS = ("--extra-experimental-features", "nix-command flakes")
NIX_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")
TOPLEVEL_ATTR = "config.system.build.toplevel"


def toplevel_installable(ref: str, name: str) -> str:
    """`REF#nixosConfigurations.NAME.config.system.build.toplevel` (NAME quoted when it is
    not a Nix identifier, e.g. `"1web"`)."""
    attr = name if NIX_IDENT_RE.fullmatch(name) else f'"{name}"'
    return f"{ref}#nixosConfigurations.{attr}.{TOPLEVEL_ATTR}"


def build_command(installable: str, *extra: str) -> list[str]:
    return ["nix", *NIX_FLAGS, "build", "--no-link", "--json", *extra, installable]


def out_path_of_build(stdout: str) -> str | None:
    """The `out` path from `nix build --json` (`[{"drvPath": …, "outputs": {"out": …}}]`);
    None when the output is not that shape."""
    try:
        data = json.loads(stdout)
    except ValueError:
        return None
    if not isinstance(data, list) or not data or not isinstance(data[-1], dict):
        return None
    outputs = data[-1].get("outputs")
    out = outputs.get("out") if isinstance(outputs, dict) else None
    return out if isinstance(out, str) else None


def copy_from_command(cache: BinaryCache, path: str) -> list[str]:
    """Fetch `path`'s closure from `cache`, accepting only paths signed by its key.

    `require-sigs` is forced on and `trusted-public-keys` is exactly the key the
    controller named, so neither the host's nix.conf nor another cache key lets an
    unsigned or foreign-signed closure in."""
    return ["nix", *NIX_FLAGS, "copy", "--from", cache.url,
            "--option", "require-sigs", "true",
            "--option", "trusted-public-keys", cache.public_key, path]


def public_key_of_secret(text: str, source: str = "secret key") -> str:
    """The public half (`name:base64(32 bytes)`) of a Nix signing key file's text
    (`name:base64(64 bytes)`, as written by `nix-store --generate-binary-cache-key`)."""
    name, sep, data = text.strip().partition(":")
    try:
        raw = base64.b64decode(data, validate=True) if sep and name else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise InputError(f"{source} is not a Nix signing key (want NAME:BASE64 as written by "
                         "'nix-store --generate-binary-cache-key')")
    public = f"{name}:{base64.b64encode(raw[32:]).decode()}"
    if not NIX_PUBLIC_KEY_RE.fullmatch(public):
        raise InputError(f"{source}: invalid key name {name!r}")
    return public


def explain_fetch_failure(path: str, cache: BinaryCache, tail: Sequence[str]) -> str | None:
    """A clear sentence for the two refusals that matter; None for other failures."""
    text = "\n".join(tail)
    key_name = cache.public_key.partition(":")[0]
    if "hash mismatch" in text:
        return (f"refused {path} from {cache.url}: its NAR does not match the signed hash "
                "(tampered or corrupt); nothing was switched")
    if "lacks a valid signature" in text or "is not signed by any of the keys" in text:
        return (f"refused {path} from {cache.url}: not signed by the trusted cache key "
                f"{key_name}; nothing was switched")
    return None
