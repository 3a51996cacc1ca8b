"""Stage 2: one deployment as a pure stage machine and the thin loop that carries it out."""
