"""What `fleetctl deploy --system` accepts (checked before anything is published).

- an absolute Nix store path: `/nix/store/<hash>-<name>[/...]` (a name is enough);
- an existing absolute directory (a simulated system, as the sim backend and tests use);
- a flake reference: `REF#ATTR` (`.#web1`, `/srv/fleet#web1`) or one with a scheme
  (`github:`, `gitlab:`, `sourcehut:`, `git+https:`, `git+ssh:`, `git+file:`, `path:`,
  `tarball+https:`, `file+https:`, `flake:`...).

Anything else (`hello world`, `./result`, `/nonexistent/dir`, `nixpkgs`) is a usage error
(exit 2) with an example: on NixOS a relative path would otherwise be read as a flake ref.
"""

from __future__ import annotations

import re
from pathlib import Path

from protocol.errors import UsageError

# The store path's name is not checked further (the host's fetch does): simulated fleets
# use names like /nix/store/web-25.11.
STORE_PATH = re.compile(r"^/nix/store/[A-Za-z0-9+._?=-]+(/\S*)?$")
SCHEME = re.compile(r"^(github|gitlab|sourcehut|flake|path|git\+(https?|ssh|file)"
                    r"|(tarball|file)\+(https?|file)|hg\+(https?|ssh|file)|https?):\S+$")
FLAKE_ATTR = re.compile(r"^\S+#[A-Za-z0-9_.\"'-][^\s]*$")
EXAMPLE = ("e.g. --system /nix/store/<hash>-nixos-system-web1-25.05, --system .#web1 or "
           "--system github:me/fleet#web1")


def check_system(text: str) -> str:
    """`text` if it names something deployable, else UsageError (one line)."""
    if not text or text != text.strip() or any(c in text for c in "\n\r\t\x00"):
        raise UsageError(f"--system {text!r} is neither a store path nor a flake ref; "
                         f"{EXAMPLE}")
    if STORE_PATH.fullmatch(text) or SCHEME.fullmatch(text) or FLAKE_ATTR.fullmatch(text):
        return text
    if text.startswith("/"):
        if Path(text).is_dir() and text.rstrip("/") not in ("", "/nix/store"):
            return text
        raise UsageError(f"--system {text!r} is no store path and no existing directory; "
                         f"{EXAMPLE}")
    raise UsageError(f"--system {text!r} is neither an absolute store path nor a flake ref"
                     f" (REF#ATTR or a scheme such as github:); {EXAMPLE}")
