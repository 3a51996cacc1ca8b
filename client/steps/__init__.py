"""Stage 3: state steps: which checks, dumps, migrations and restores run, and running them."""
