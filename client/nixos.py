"""NixOS backend: does what nixos-rebuild does. (Filled in by issue 4.)"""

from __future__ import annotations

from pathlib import Path

from client.backend import BackendError


class NixosBackend:
    name = "nixos"

    def __init__(self, root: Path, state_dir: Path) -> None:
        raise BackendError("the nixos backend is not implemented yet")
