"""Stage 4: every side effect on the host, behind one backend interface (NixOS or simulated)."""
