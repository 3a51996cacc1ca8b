"""Rollouts: the pure planner, the driver that publishes its actions, steering, answers, checks."""
