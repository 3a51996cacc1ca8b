"""Stage 6: everything the agent tells the world: progress, results, log lines, retained state."""
