"""What the controller keeps: inventory, keys, the JSON-Patch event log, deployment logs."""
