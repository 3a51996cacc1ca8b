"""Per-host builds, the signed binary cache, and what `--system` accepts."""
